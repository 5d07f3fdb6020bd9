"""Training: experiment configs (``config``), the stage-1 Lightning module (``module``) and runner
(``cnn``), and the ``pedetect split`` / ``pedetect train`` commands (``command``).

Import the submodules directly; this package imports nothing heavy.
"""
