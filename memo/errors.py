"""The base class of errors a user can act on.

A :class:`UserError` comes from input or setup (a missing file, an image without a face, an unknown
setting, too little GPU memory); its message says what is wrong and what to do, and the command-line
programs print it without a traceback.
"""


class UserError(Exception):
    """An error caused by the user's input or setup, with a message that says how to fix it."""
