"""What several test files share: generated images, features, training data and checkpoints,
a real HTTP server, subprocess runners and hostile-case helpers. Fixtures built on them live in
``tests/conftest.py``."""
