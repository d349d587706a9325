"""A fleet of sim-servers in one process, for the demo and the integration tests.

    async with SimFleet(config, replicas=3, time_scale=0.1) as fleet:
        report = await loadgen.run_load(fleet.urls, phases, seed=0)
        fleet.addresses  # ["127.0.0.1:41235", ...]: Prometheus scrape targets

Each replica is a SimServer on a loopback ephemeral port with its own seed (seed + i), so
replicas draw different speculative acceptances. They share one EngineModel: its step table
is pure data, filled once for all of them.
"""

from __future__ import annotations

from types import TracebackType

from trilemma.optimizer.search.configs import ServingConfig
from trilemma.simfleet.engine_model import DEFAULT_PREDICTABILITY, EngineModel
from trilemma.simfleet.server import SimServer


class SimFleet:
    """`replicas` sim-servers of one configuration (None: the config's own replica count)."""

    def __init__(self, config: ServingConfig, *, replicas: int | None = None,
                 served_model_name: str | None = None, seed: int = 0,
                 time_scale: float = 1.0, output_predictability: float = DEFAULT_PREDICTABILITY,
                 request_overhead_ms: float | None = None, host: str = "127.0.0.1") -> None:
        count = config.replicas if replicas is None else replicas
        if count < 1:
            raise ValueError(f"a fleet needs at least one replica, got {count}")
        self.model = EngineModel(config, output_predictability=output_predictability,
                                 request_overhead_ms=request_overhead_ms)
        self.host = host
        self.servers = [SimServer(self.model, served_model_name=served_model_name,
                                  seed=seed + i, time_scale=time_scale)
                        for i in range(count)]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def addresses(self) -> list[str]:
        """host:port of every server, as a Prometheus static_configs target list."""
        return [s.url.removeprefix("http://") for s in self.servers]

    @property
    def served_model_name(self) -> str:
        return self.servers[0].served_model_name

    async def start(self) -> list[str]:
        try:
            for server in self.servers:
                await server.start(self.host, 0)
        except BaseException:
            await self.stop()
            raise
        return self.urls

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
