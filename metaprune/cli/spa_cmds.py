"""Commands of this stage (filled in by the stage that owns them)."""


def register(sub) -> None:
    """No commands yet."""
