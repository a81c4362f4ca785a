"""selbench's built-in selection strategies.

Each module here is a plugin registered in selbench's pyproject.toml under the
``selbench`` entry-point group, exactly as a third-party package would register one.
"""
