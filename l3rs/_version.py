"""The package version, in a module of its own so that any module can read it without importing ``l3rs`` itself
(whose ``__init__`` imports the public API, and with it most of the package)."""

__version__ = "0.1.0"
