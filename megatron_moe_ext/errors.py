"""The one user-error type: what the user asked for cannot be done, said in one sentence.

Every check of flags, files and folders raises a subclass of `UserError` with a message that
names the flag or file and the fix. `cli.main` prints it as `megatron-moe-ext VERB: error: ...`
and exits 2, as argparse does; library callers catch it like any ValueError.
"""

from __future__ import annotations


class UserError(ValueError):
    """An invalid flag, value, file or folder; the message is one sentence naming it and the fix."""
