"""The verbs of `megatron-moe-ext`, one module each: `register(subparsers)` adds the sub-parser and
sets `func` (namespace -> exit code). Verbs raise `errors.UserError`; `cli.main` prints it."""
