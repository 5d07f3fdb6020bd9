"""What several test files share, imported by name (``from helpers.train import tiny_config``):
plain functions, classes and constants. pytest fixtures are in the conftest.py of the folder that
holds all their users (tests/conftest.py for the whole suite, tests/hospital/conftest.py, …).

tests/ is on ``sys.path`` under pytest (``pythonpath`` in pyproject.toml); a test file run as a
script puts it there itself."""
