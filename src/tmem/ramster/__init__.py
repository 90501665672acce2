"""RAMster: a cluster of tmem nodes that lend each other RAM.

Optional layer: ``import tmem`` and plain Zcache use never import this package.
This module stays import-light on purpose (no submodule imports, no sockets),
so importing ``tmem.ramster`` costs nothing until a submodule is used:

* :mod:`tmem.ramster.wire` -- sans-IO frame codec and typed message model
  (the kernel's r2net message layer).
* :mod:`tmem.ramster.handshake` -- sans-IO mutual HMAC authentication that
  runs over the same framing before any data message is accepted.
"""

from __future__ import annotations
