"""mdx-train's user-error type, in a module without torch so that the CLI can name it before
it imports the trainer (option parsing stays quick, and a missing torch is reported as such)."""


class TrainError(ValueError):
    """A bad training option or run folder; the message names the problem."""
