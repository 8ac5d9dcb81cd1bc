"""The one exception type for bad user input (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a config, model, data or path problem.

    The message is one line that names what is wrong and where; the CLI prints it and
    exits with code 2.
    """
