"""User-facing errors: one clear line (what is wrong, where, how to fix), never a traceback."""
import functools
import sys


class FSEFTError(Exception):
    """A problem with the user's input. The message must say what, where, and the fix."""


def fail(message: str) -> "SystemExit":
    """Exit from inside nnU-Net's own commands (train/predict) with one line and no traceback."""
    return SystemExit(f"nnunetv2_fseft: error: {message}")


def cli_entry(main):
    """Wrap a console-script main(): FSEFTError becomes one line on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except FSEFTError as e:
            print(f"nnunetv2_fseft: error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("nnunetv2_fseft: interrupted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
            sys.stderr.close()
            sys.exit(141)
    return wrapper
