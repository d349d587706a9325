"""`trilemma demo` against KMock, an emulated Kubernetes API, where no real control plane is
built. KMock is the `demo` extra: without it this says how to install it instead of failing
on an import (the operator image, for one, ships without it).
"""

from __future__ import annotations

from pathlib import Path

from trilemma.simfleet.prometheus_server import free_port
from trilemma.tools.demo.process import environment, interruptible
from trilemma.tools.demo.scenario import RESYNC_S, DemoOptions, operator_config
from trilemma.tools.demo.scoring import EXIT_MISSING_EXTRA, DemoResult
from trilemma.tools.demo.story import tell
from trilemma.tools.demo.timeline import Timeline
from trilemma.tools.demo.watcher import Watcher

MISSING_KMOCK = ("the emulated Kubernetes API needs KMock, which is not installed: install "
                 "trilemma[demo] (pip install 'trilemma[demo]'), or build a real control "
                 "plane (bash .ci/install-kube) and run with --control-plane real")


def kmock_missing() -> bool:
    """True when KMock cannot be imported (the `demo` extra is not installed)."""
    try:
        import kmock  # noqa: F401
    except ImportError:
        return True
    return False


async def run_on_kmock(options: DemoOptions, timeline: Timeline, binary: str | None,
                       tmp: Path) -> DemoResult:
    if kmock_missing():
        result = DemoResult(shift=options.shift, exit_code=EXIT_MISSING_EXTRA,
                            message=MISSING_KMOCK)
        timeline.add("stop", result.message)
        return result
    # Imported here: `trilemma --help` imports every command's module, and these pull in
    # Kopf, KMock and the operator's handlers.
    import kmock

    from trilemma.tools.emulator import Api, ForgetfulEmulator, declare_resources, write_kubeconfig
    from trilemma.tools.inprocess import Operator

    timeline.say("trilemma demo: the closed loop on this machine - an emulated Kubernetes API "
                 "(KMock), the operator in-process, a simulated vLLM fleet and a real "
                 "Prometheus, all on loopback")
    async with ForgetfulEmulator() as server, kmock.Server(server):
        declare_resources(server)
        kubeconfig = tmp / "kubeconfig"
        write_kubeconfig(kubeconfig, str(server.url))
        env = {"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": None,
               "TRILEMMA_RESYNC_SECONDS": f"{RESYNC_S:g}"}
        prometheus_port = free_port()
        operator = Operator(config=operator_config(prometheus_port))
        with environment(env):
            await operator.start()
            try:
                with interruptible():
                    timeline.add("start", f"KMock serves the Kubernetes API at "
                                          f"{str(server.url).rstrip('/')}; the operator runs "
                                          f"in-process (resync every {RESYNC_S:g} s)")
                    watcher = Watcher(options, timeline, Api(server))
                    return await tell(watcher, binary, tmp, prometheus_port, operator.metrics)
            finally:
                await operator.stop()
