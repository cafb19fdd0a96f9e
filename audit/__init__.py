"""Privacy audit of one server's view of a federated run (``decentsim audit --role``): see
``docs/audit.md``. Each server has its own auditor; nothing here combines the two views.

- :mod:`audit.load`: one server's view of a run dir (its transcript, opened with its auditor's key);
- :mod:`audit.views`: the typed model the checks read (the view, share rows, what was not used);
- :mod:`audit.truth`: ground truth from the pools' own stores;
- :mod:`audit.checks`: the checks and their verdicts;
- :mod:`audit.report`: JSON, Markdown, HTML and plots.
"""
