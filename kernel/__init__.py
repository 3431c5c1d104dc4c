"""Open-AutoGLM Kernel: a single-node scheduler for LLM work on one GPU box.

Layering (a module imports only from the layers above it):

* ``errors``, ``clock``, ``records``, ``durations``, ``ids`` — leaves: the error tree and
  catalogue, the only reader of time, typed records.
* ``wheel`` (the hierarchical timing wheel), ``triggers`` (cron / ``@every`` / DST policy),
  ``config`` (typed config.toml) — pure structures and decoding.
* ``store`` (the durable store: sqlite and memory), ``events`` (typed events and the bus),
  ``hookspecs`` / ``plugins`` / ``builtin_actions`` (the plugin contract and loading).
* ``dispatch`` (which jobs start: a synchronous decision), ``misfire``, ``retry`` (pure policies),
  ``validate`` (semantic config checks).
* ``app`` (the ``Kernel``: wiring and lifecycle), observers (``logs``, ``metrics``, ``tui``),
  ``api`` (HTTP), ``main`` (the composition root), ``cli`` / ``client`` (the command line).
"""

__version__ = "0.1.0"
