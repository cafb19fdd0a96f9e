"""Privacy audit of a federated run (``decentsim audit``): see ``docs/audit.md``.

- :mod:`audit.transcript`: the servers' sealed transcripts (recording and reading);
- :mod:`audit.views`: the typed model the checks read (views, share rows, ground truth);
- :mod:`audit.truth`: ground truth from the pools' own stores;
- :mod:`audit.checks`: the checks and their verdicts;
- :mod:`audit.report`: JSON, Markdown, HTML and plots; :mod:`audit.cli`: the command.
"""
