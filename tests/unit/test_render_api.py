"""The render package's public facade, pinned so that growing it is a decision."""

from trilemma.optimizer import render


def test_the_render_facade_exports_exactly_these_names():
    assert set(render.__all__) == {
        "CACHE_MOUNT", "DEFAULT_IMAGES", "Arg", "InferencePoolOptions", "RenderOptions",
        "RenderPlan", "RenderedWorker", "Role", "Source", "bootstrap_port", "decided_flags",
        "engine_args", "gateway", "layout", "manifests", "overridden_flag", "render_text",
        "render_yaml"}


def test_every_rendered_flag_records_where_it_came_from():
    from trilemma.optimizer.search.configs import ServingConfig, WorkerConfig

    cfg = ServingConfig(model="Qwen/Qwen3-8B", worker=WorkerConfig(gpu="h100_sxm"))
    plan = render.layout(cfg, "vllm", name="x")
    sources = {s.value for s in render.Source}
    assert set(plan.provenance["server"].values()) <= sources
    assert plan.provenance["server"]["--port"] == "renderer default"
    assert plan.image_source is render.Source.RENDERER
