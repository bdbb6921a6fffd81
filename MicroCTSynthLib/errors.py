"""The one exception a user is meant to read."""


class MicroCTSynthError(ValueError):
    """A problem the user can fix, told in one sentence (missing file, bad geometry, ...).

    The command line prints the message and exits with status 2, without a traceback; the
    Slicer module shows it with ``slicer.util.tryWithErrorDisplay``. It derives from
    ``ValueError`` so callers that expect the Slicer template's convention catch it too.
    """
