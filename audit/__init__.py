"""Privacy audit of a federated run (``decentsim audit``): see ``docs/audit.md``.

- :mod:`audit.views`: the typed model the checks read (views, share rows);
- :mod:`audit.truth`: ground truth from the pools' own stores;
- :mod:`audit.checks`: the checks and their verdicts;
- :mod:`audit.report`: JSON, Markdown, HTML and plots.
"""
