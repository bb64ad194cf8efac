"""Every error the SPA runtime raises on purpose.

A `SpaError` is a user-facing problem (bad input, missing file, mismatched
plugin): the `spa` command prints its message on one line and exits with
status 2, never a traceback. Anything else escaping is a bug.
"""


class SpaError(Exception):
    """A problem the user can fix; the message names what was wrong."""


class BackboneError(SpaError):
    """The backbone could not be found, loaded or converted."""


class PluginError(SpaError):
    """A plugin directory or `.pte` file is missing, corrupt or mismatched."""


class DataError(SpaError):
    """The data set or a document could not be read."""
