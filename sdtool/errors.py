"""The one exception users see.

Anything a user can cause (a bad recipe key, missing data, a foreign checkpoint, an out-of-range ratio)
raises `SdtoolError` with a single line that names the problem and the fix. The CLI prints that line and
exits with status 1; everything else is a bug and keeps its traceback.
"""


class SdtoolError(Exception):
    """A problem the user can fix; its message is one line saying what is wrong and what to do."""
