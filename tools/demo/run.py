"""`trilemma demo`'s entry point: picks the control plane (a real one when its binaries are
built, else KMock), runs the story on it and returns the result with the timeline."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TextIO

from trilemma.simfleet.prometheus_server import find_prometheus
from trilemma.tools.demo.cluster import run_on_cluster
from trilemma.tools.demo.emulated import run_on_kmock
from trilemma.tools.demo.process import capture_logging
from trilemma.tools.demo.scenario import SHIFTS, DemoOptions
from trilemma.tools.demo.scoring import EXIT_NO_ROLLOUT, DemoResult
from trilemma.tools.demo.timeline import Timeline


async def run_demo(options: DemoOptions, out: TextIO | None = None) -> DemoResult:
    """The whole demo; prints the timeline to `out` (None: silent) and returns the result.
    Cancelling it (Ctrl-C) stops everything it started."""
    if options.shift not in SHIFTS:
        raise ValueError(f"shift must be one of {SHIFTS}, got {options.shift!r}")
    timeline = Timeline(out)
    binary = options.prometheus or find_prometheus()
    with tempfile.TemporaryDirectory(prefix="trilemma-demo-") as tmp, \
            capture_logging(options.verbose) as problems:
        result = await _run(options, timeline, binary, Path(tmp))
        result.log_problems = problems.records[-20:]
    result.timeline = timeline.events
    return result


async def _run(options: DemoOptions, timeline: Timeline, binary: str | None,
               tmp: Path) -> DemoResult:
    from trilemma.simfleet.cluster import find_kube_bin

    bin_dir = find_kube_bin() if options.control_plane != "kmock" else None
    if bin_dir is not None:
        return await run_on_cluster(options, timeline, binary, tmp, bin_dir)
    if options.control_plane == "real":
        from trilemma.simfleet.cluster import INSTALL_HINT as KUBE_HINT

        result = DemoResult(shift=options.shift, exit_code=EXIT_NO_ROLLOUT,
                            message=f"no Kubernetes control-plane binaries: {KUBE_HINT}")
        timeline.add("stop", result.message)
        return result
    return await run_on_kmock(options, timeline, binary, tmp)
