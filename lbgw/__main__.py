"""``python -m lbgw``: the same as the ``lbgw`` command.

SIGTERM, SIGINT and SIGHUP that come while lbgw imports (a worker started by
``--workers`` runs this way; importing grpc takes a while on a busy machine)
are remembered here and handed to ``cli`` before it runs: a SIGHUP then
is not fatal, and a SIGTERM still stops lbgw cleanly.
"""

import signal
import sys

_early: list[int] = []


def _remember(signum: int, frame: object) -> None:
    _early.append(signum)


_DEFAULTS = {
    sig: signal.signal(sig, _remember) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
}

from lbgw import cli  # noqa: E402 - after the handlers, on purpose

if len(sys.argv) > 1 and sys.argv[1] == "serve":
    cli.remember_early(_early)
else:  # other commands: the signals' usual meaning
    for _sig, _default in _DEFAULTS.items():
        signal.signal(_sig, _default)
    for _signum in _early:
        signal.raise_signal(_signum)

sys.exit(cli.main())
