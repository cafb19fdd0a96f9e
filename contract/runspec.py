"""The public description of a federated run, shared by the coordinator and the devices.

A :class:`RunSpec` is what every party may know: population label, seed, days, θ, model
options, posting mode, radio, timing. It is persisted by the coordinator (so a restarted
coordinator resumes the same run) and published to devices in every ``RoundSchedule``
(``run_json``). It carries nothing about an individual.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from behaviour.openai_http import OpenAIClient
from contract.schedule import observations_dp
from protocols.ble.gaen import TEK_ROLLING_PERIOD
from protocols.ble.radio import DEFAULT_EPOCH
from protocols.clock import RunClock
from protocols.secure_sum.dp import DPError
from sim.archetypes import ArchetypeError, ArchetypeGrid
from sim.calibration import ObservedSeries, series_loss
from sim.model import Lockdown, ModelConfig, ModelConfigError, Stimulus, Vaccination
from sim.params import BASE_PARAMS, PARAM_NAMES, Theta
from sim.runner import total_infections
from sim.sampling import Estimator

if TYPE_CHECKING:
    from protocols.secure_sum.dp import DPConfig

MODES = ("mailbox", "shuffled", "dense", "plaintext")
BEHAVIOURS = ("heuristic", "table", "llm")
RADIOS = ("ideal", "simulated")
#: the fields of ``RunSpec.dp``
DP_FIELDS = ("sigma", "delta", "l2_sensitivity")


#: slots a device registers a day for its physical radio in a run with pilots (one per interval)
PHYSICAL_INTERVALS = TEK_ROLLING_PERIOD


class RunSpecError(ValueError):
    """A run description is invalid; the message names the field."""


@dataclass(frozen=True)
class RunSpec:
    """One federated run: days × epochs rounds under public settings.

    Attributes:
        population: how devices load their agents (``synthetic:N`` or a directory path).
        days, seed: length of one epoch and the seed of every counter-based draw.
        mode: secure-sum posting mode (``mailbox``, ``shuffled``, ``dense``, ``plaintext``).
        theta: initial θ by name; parameters not named keep their defaults.
        epochs: calibration epochs (1 = a plain run); θ steps between epochs.
        lr: step size of the θ update on log θ (Adam, ``sim.calibration.ThetaOptimizer``).
        fit: the parameters the θ steps fit; the others stay exactly at ``theta``.
        target: observed weekly counts (the coordinator's loss), or ``None``: loss = total
            new infections, exactly as ``decentsim simulate``.
        items_per_device: the public per-device budget of the messages phase: a participant
            hosting m devices posts exactly ``m × items_per_device`` items.
        advertising_intervals: 10-minute beacon intervals each device advertises per day.
        radio: ``ideal`` (equivalence) or ``simulated`` (path loss, noise, duty cycle).
        pools: participants (enrolled credentials) the coordinator waits for before day 0.
        step_timeout_s: deadline of each step of a round; late participants drop out of it.
        lockdowns, vaccinations: ``LAYER:DAY:SCALE`` / ``DAY:FRACTION[:EFFICACY]`` strings.
        estimator, population_seeds: as the ``simulate`` options of the same names.
        min_cohort: a pseudonym slot whose agreed summands (padding dummies included) number
            fewer than this is released as zeros by both servers (0: off); see docs/audit.md.
        dp: differential privacy of the daily aggregates, ``{"sigma": σ, "delta": δ,
            "l2_sensitivity": Δ}`` in real units of the observation vector, or ``None`` (exact
            aggregates). Both servers add discrete Gaussian noise (σ in total) to every opened
            ``global/day/<d>``; the aggregator's operator must configure the same values. The
            decentralized = central equivalence does not hold with it on (by design); see
            ``protocols/secure_sum/LEAKAGE.md``.
        behaviour: ``heuristic`` (the archetypes), ``table`` (the public table file
            ``behaviour_table``) or ``llm`` (a language model at ``llm_url`` named
            ``llm_model``, asked by the coordinator once per cell, behaviour and period, from
            public cell attributes and the run's opened aggregates). With ``table`` or ``llm``
            the coordinator sends every device the period's row; each device draws its own
            choices from it (``sim.model.behaviour``).
        grid: the archetype grid (``sim.archetypes.ArchetypeGrid.to_json``: public attribute
            levels) of a ``table``/``llm`` run.
        period_days, work_layer, stimuli: the table's period, the layer a day off work
            removes, and ``MONTH:AMOUNT`` stimulus payments (public policy in the prompts).
        llm_timeout_s, llm_retries: the coordinator's language-model client: seconds per
            request, and retries of a 5xx/429 answer or a timeout (with back-off).
        llm_gguf: an ``llm`` run without a server: the GGUF model file the coordinator runs
            in process (``decentsim[llm-local]``), instead of ``llm_url``/``llm_model``.
        pilots: the pilot agents of a hybrid run (agent ids, each bound to one enrolled
            physical device running ``device-agent run --pilot-agent ID``). Contacts between
            two pilots come from their real radios; every other contact from the population's
            graph as in a simulated run. Empty: every agent is simulated.
        clock_scale, clock_wall_epoch: the run clock of a hybrid run (:meth:`clock`):
            protocol time is ``sim day 0 + clock_scale × (wall − clock_wall_epoch)``, 1 for a
            pilot in real time (a test runs e.g. 1440: a day a minute).
        round_at_s: a run with pilots opens day ``d``'s round this many protocol seconds after
            protocol day ``d`` is over (0: at midnight; 7200: at 02:00, when phones charge).
    """

    population: str
    days: int
    seed: int = 0
    mode: str = "mailbox"
    theta: dict[str, float] = field(default_factory=lambda: asdict(Theta()))
    epochs: int = 1
    lr: float = 0.1
    fit: tuple[str, ...] = ("beta", "init_frac")
    target: list[float] | None = None
    target_period_days: int = 7
    items_per_device: int = 32
    advertising_intervals: int = 1
    radio: str = "ideal"
    pools: int = 1
    step_timeout_s: float = 60.0
    lockdowns: tuple[str, ...] = ()
    vaccinations: tuple[str, ...] = ()
    estimator: str = "st"
    population_seeds: bool = False
    min_cohort: int = 0
    dp: dict[str, float] | None = None
    behaviour: str = "heuristic"
    behaviour_table: str | None = None
    llm_url: str | None = None
    llm_model: str | None = None
    grid: list[dict[str, object]] | None = None
    period_days: int = 7
    work_layer: str = "work"
    stimuli: tuple[str, ...] = ()
    llm_timeout_s: float = 60.0
    llm_retries: int = 3
    llm_gguf: str | None = None
    pilots: tuple[int, ...] = ()
    clock_scale: float = 1.0
    clock_wall_epoch: float = 0.0
    round_at_s: float = 0.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.theta) - set(PARAM_NAMES))
        if unknown:
            raise RunSpecError(f"run spec: theta names unknown parameter(s) {unknown}")
        # parameters not named keep their defaults (the alignment's identity), so a spec always
        # carries all of θ, in order
        object.__setattr__(self, "theta", {**asdict(Theta()), **self.theta})
        checks: list[tuple[bool, str]] = [
            (self.days >= 1, f"days must be >= 1, got {self.days}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.radio in RADIOS, f"radio must be one of {RADIOS}, got {self.radio!r}"),
            (self.pools >= 1, f"pools must be >= 1, got {self.pools}"),
            (self.items_per_device >= 1, "items_per_device must be >= 1"),
            (1 <= self.advertising_intervals <= 144, "advertising_intervals must be in 1..144"),
            (
                math.isfinite(self.step_timeout_s) and self.step_timeout_s > 0,
                f"step_timeout_s must be > 0, got {self.step_timeout_s}",
            ),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.target_period_days >= 1, "target_period_days must be >= 1"),
            (self.min_cohort >= 0, f"min_cohort must be >= 0, got {self.min_cohort}"),
            (
                self.mode != "dense" or self.min_cohort <= 1,
                f"min_cohort={self.min_cohort} needs per-slot summand counts, which dense mode "
                "hides from both servers: use mailbox or shuffled mode for a minimum cohort",
            ),
            (
                bool(self.fit) and set(self.fit) <= set(BASE_PARAMS),
                f"fit must name some of {BASE_PARAMS} (a federation differentiates those), "
                f"got {list(self.fit)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RunSpecError(f"run spec: {message}")
        self._check_behaviour()
        self._check_pilots()
        if self.target is not None and len(self.target) * self.target_period_days > self.days:
            raise RunSpecError(
                f"run spec: target covers {len(self.target) * self.target_period_days} days, "
                f"more than days={self.days}"
            )
        self.theta_object()
        self.model_config()
        self.dp_config()

    def _check_pilots(self) -> None:
        pilots = self.pilots
        if any(isinstance(a, bool) or not isinstance(a, int) or a < 0 for a in pilots):
            raise RunSpecError(f"run spec: pilots must be agent ids (ints >= 0), got {pilots}")
        if len(set(pilots)) != len(pilots):
            raise RunSpecError(f"run spec: pilots names an agent twice: {pilots}")
        if not (math.isfinite(self.clock_scale) and self.clock_scale > 0):
            raise RunSpecError(f"run spec: clock_scale must be > 0, got {self.clock_scale}")
        if not (math.isfinite(self.clock_wall_epoch) and self.clock_wall_epoch >= 0):
            raise RunSpecError(
                f"run spec: clock_wall_epoch must be unix seconds >= 0, got {self.clock_wall_epoch}"
            )
        if not (math.isfinite(self.round_at_s) and 0 <= self.round_at_s < 86400):
            raise RunSpecError(f"run spec: round_at_s must be in [0, 86400), got {self.round_at_s}")
        if pilots:
            if self.epochs != 1:
                raise RunSpecError(
                    "run spec: a run with pilots has one epoch (real contacts happen once)"
                )
            if self.clock_wall_epoch == 0:
                raise RunSpecError("run spec: a run with pilots needs clock_wall_epoch")
            if self.advertising_intervals != 144:
                raise RunSpecError(
                    "run spec: a run with pilots advertises all day (advertising_intervals=144)"
                )

    @property
    def beacons_per_day(self) -> int:
        """Slots each device registers a day (one group): its simulated beacons, plus in a run
        with pilots one slot per 10-minute interval of its physical radio (the beacons it put
        on the air; a simulated device, or a pilot whose radio was off, registers padding
        instead), so a pilot registers exactly as many slots as a simulated device."""
        return self.advertising_intervals + (PHYSICAL_INTERVALS if self.pilots else 0)

    def clock(self) -> RunClock:
        """The run clock (simulated day 0 starts at protocol time ``DEFAULT_EPOCH``)."""
        return RunClock(
            sim_epoch=float(DEFAULT_EPOCH), scale=self.clock_scale, wall_epoch=self.clock_wall_epoch
        )

    def theta_object(self) -> Theta:
        """θ as a validated ``Theta`` (raises ``ParameterError`` naming a bad value)."""
        return Theta(**{k: float(v) for k, v in self.theta.items()})

    def _check_behaviour(self) -> None:
        if self.behaviour not in BEHAVIOURS:
            raise RunSpecError(
                f"run spec: behaviour must be one of {BEHAVIOURS}, got {self.behaviour!r}"
            )
        needs = {
            "table": ("behaviour_table", "grid"),
            "llm": ("llm_gguf", "grid") if self.llm_gguf else ("llm_url", "llm_model", "grid"),
        }.get(self.behaviour, ())
        missing = [name for name in needs if not getattr(self, name)]
        if missing:
            raise RunSpecError(f"run spec: a {self.behaviour} run needs {missing}")
        if not (math.isfinite(self.llm_timeout_s) and self.llm_timeout_s > 0):
            raise RunSpecError(f"run spec: llm_timeout_s must be > 0, got {self.llm_timeout_s}")
        if self.llm_retries < 0:
            raise RunSpecError(f"run spec: llm_retries must be >= 0, got {self.llm_retries}")
        if self.behaviour == "llm" and self.llm_gguf and (self.llm_url or self.llm_model):
            raise RunSpecError("run spec: an llm run names llm_gguf or llm_url/llm_model, not both")
        if self.behaviour == "llm" and not self.llm_gguf:
            self.llm_client()
        if self.grid is not None:
            try:
                ArchetypeGrid.from_json(self.grid)
            except ArchetypeError as e:
                raise RunSpecError(f"run spec: grid: {e}") from None

    def llm_client(self) -> OpenAIClient:
        """The client of an ``llm`` run's model endpoint (no connection is made yet).

        Raises:
            RunSpecError: not an ``llm`` run with a server, or ``llm_url`` is not
                ``http(s)://HOST…``.
        """
        if self.llm_url is None or self.llm_model is None:
            raise RunSpecError("run spec: this run asks no language model server")
        try:
            return OpenAIClient(
                self.llm_url, self.llm_model, timeout=self.llm_timeout_s, retries=self.llm_retries
            )
        except ValueError as e:
            raise RunSpecError(f"run spec: llm_url: {e}") from None

    def archetype_grid(self) -> ArchetypeGrid:
        """The run's archetype grid (a ``table``/``llm`` run)."""
        if self.grid is None:
            raise RunSpecError("run spec: this run has no behaviour table grid")
        return ArchetypeGrid.from_json(self.grid)

    def model_config(self) -> ModelConfig:
        """The model settings of the run (the same ``ModelConfig`` ``decentsim simulate`` builds
        from the same options)."""
        try:
            locks = tuple(
                Lockdown(p[0], int(p[1]), float(p[2]))
                for p in (s.split(":") for s in self.lockdowns)
            )
            vacs = tuple(
                Vaccination(int(p[0]), float(p[1]), *(float(x) for x in p[2:]))
                for p in (s.split(":") for s in self.vaccinations)
            )
            stimuli = tuple(
                Stimulus(int(p[0]), float(p[1])) for p in (s.split(":") for s in self.stimuli)
            )
        except (ValueError, IndexError) as e:
            raise RunSpecError(f"run spec: bad intervention: {e}") from None
        try:
            return ModelConfig(
                lockdowns=locks,
                vaccinations=vacs,
                estimator=Estimator(self.estimator),
                use_population_seeds=self.population_seeds,
                behaviour="heuristic" if self.behaviour == "heuristic" else "table",
                period_days=self.period_days,
                work_layer=self.work_layer,
                stimuli=stimuli,
            )
        except (ModelConfigError, ValueError) as e:
            raise RunSpecError(f"run spec: {e}") from None

    def loss_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The run's loss on (T, 2, G) aggregates: the target's, else total new infections
        (exactly what ``decentsim simulate --grad`` reports)."""
        if self.target is None:
            return total_infections
        target = ObservedSeries(
            torch.tensor(self.target, dtype=torch.float64), self.target_period_days
        )
        return series_loss(target)

    def dp_config(self) -> DPConfig | None:
        """The observations phase's ``DPConfig`` (``None`` without DP).

        Raises:
            RunSpecError: ``dp`` lacks or adds a field, or a value is invalid (named).
        """
        if self.dp is None:
            return None

        if not isinstance(self.dp, dict) or set(self.dp) != set(DP_FIELDS):
            got = sorted(self.dp) if isinstance(self.dp, dict) else type(self.dp).__name__
            raise RunSpecError(f"run spec: dp must have exactly the fields {DP_FIELDS}, got {got}")
        try:
            return observations_dp(**self.dp)
        except DPError as e:
            raise RunSpecError(f"run spec: dp.{e}") from None

    def to_json(self) -> str:
        """Canonical JSON (sorted keys)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "run spec") -> RunSpec:
        """Parse :meth:`to_json` output; errors name ``source`` and the bad field."""
        try:
            raw: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as e:
            raise RunSpecError(f"{source}: not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise RunSpecError(f"{source}: expected a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RunSpecError(f"{source}: unknown field(s) {unknown}")
        for name in ("lockdowns", "vaccinations", "fit", "stimuli", "pilots"):
            if name in raw:
                raw[name] = tuple(raw[name])
        try:
            return cls(**raw)
        except TypeError as e:
            raise RunSpecError(f"{source}: {e}") from None
