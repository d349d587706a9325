"""An emulated Kubernetes API (KMock) and the real Kopf operator in one event loop.

Shared by tests/operator and the operator benchmark; the harness itself lives in the package
(trilemma.tools.emulator and trilemma.tools.inprocess), where `trilemma demo` uses it too.
KMock's gaps shape it: no controllers (a test marks a Deployment available by patching its
status), no garbage collector, no label selectors, no resourceVersion (see that module).
"""

from __future__ import annotations

from trilemma.tools.emulator import (
    DEPLOYMENTS,
    OE,
    PLURALS,
    POOLS,
    Api,
    Emulator,
    ForgetfulEmulator,
    declare_resources,
    write_kubeconfig,
)
from trilemma.tools.inprocess import Operator

__all__ = ["DEPLOYMENTS", "OE", "PLURALS", "POOLS", "Api", "Emulator", "ForgetfulEmulator",
           "Operator", "declare_resources", "write_kubeconfig"]
