"""The one exception type users see as a clean one-line message (the CLI and the stages catch it)."""


class VitlabError(Exception):
    """A problem with the user's input, data or environment that has a clear, actionable message."""
