"""decentsim's central, vectorized, differentiable simulator.

``z(t+1) = f(z, ⊕M, θ, ℓ)``: the pieces are named functions in ``sim.model``; the central
runner is ``sim.runner.CentralSimulator``; the user-facing API is ``sim.env``:

    from sim import env, models, populations

Submodules are imported on use (``from sim import env`` imports ``sim.env``), so that light
users such as ``protocols`` (which borrows ``sim.rng``) do not pay for plotting imports.
"""

__all__ = ["env", "models", "populations"]
