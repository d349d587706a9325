"""The hardware pool: which GPUs the search may use, how many, at what price, where.

Each group names a GPU from the catalog (catalog/gpus.py); price and node size default to the
catalog's figures. The Kubernetes fields (extended resource name, nodeSelector, tolerations)
are inert here: the renderer copies them into manifests, and the same model becomes the
`HardwarePool` custom resource.
"""

from __future__ import annotations

import enum
import re

from pydantic import Field, field_validator, model_validator

from trilemma.optimizer.catalog import gpus
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.spec import limits
from trilemma.optimizer.spec.base import SpecModel, rule_error

# Kubernetes label keys: an optional DNS-subdomain prefix and a name of up to 63 characters.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_KEY = re.compile(rf"^({_DNS_SUBDOMAIN}/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
# Extended resources are always domain-qualified: "nvidia.com/gpu", "amd.com/gpu".
_RESOURCE_NAME = re.compile(rf"^{_DNS_SUBDOMAIN}/{_LABEL_NAME}$")

# The device plugins' resource names, by catalog vendor.
DEFAULT_RESOURCE_NAMES = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}


class TolerationOperator(enum.StrEnum):
    EQUAL = "Equal"
    EXISTS = "Exists"


class TaintEffect(enum.StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(SpecModel):
    """A Kubernetes toleration, as in a pod spec."""

    key: str | None = Field(
        default=None, description="Taint key; empty with operator Exists tolerates every taint.")
    operator: TolerationOperator = Field(
        default=TolerationOperator.EQUAL, description="Equal (key and value) or Exists (key).")
    value: str | None = Field(default=None, description="Taint value, for operator Equal.")
    effect: TaintEffect | None = Field(
        default=None, description="NoSchedule, PreferNoSchedule or NoExecute; empty = all.")
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: seconds to stay bound after the taint.")

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> Toleration:
        # The API server's own validation, caught here rather than at deploy time.
        if self.key is not None and not _LABEL_KEY.match(self.key):
            raise rule_error("not a valid taint key (a label key)", field="key", value=self.key)
        if self.operator is TolerationOperator.EXISTS and self.value:
            raise rule_error("operator Exists takes no value", field="value", value=self.value)
        if self.operator is TolerationOperator.EQUAL and not self.key:
            raise rule_error("operator Equal needs a key; use Exists to tolerate every taint",
                             field="key", value=self.key)
        if self.toleration_seconds is not None and self.effect is not TaintEffect.NO_EXECUTE:
            raise rule_error("tolerationSeconds applies only to effect NoExecute",
                             field="tolerationSeconds", value=self.toleration_seconds)
        return self


class GpuGroup(SpecModel):
    """Identical GPUs available to the search."""

    gpu: str = Field(description="GPU catalog key or alias, e.g. h100_sxm, b200, mi300x.")
    count: int = Field(ge=1, le=limits.MAX_POOL_GPUS, description="GPUs available.")
    price_per_gpu_hour: float | None = Field(
        default=None, gt=0, le=limits.MAX_PRICE_PER_GPU_HOUR,
        description="$/GPU-hour; default: the catalog's price.")
    gpus_per_node: int | None = Field(
        default=None, ge=1, le=72,
        description="GPUs per machine (Kubernetes node); default: the catalog's.")
    resource_name: str | None = Field(
        default=None,
        description="Kubernetes extended resource; default nvidia.com/gpu or amd.com/gpu.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, max_length=limits.MAX_SELECTOR_KEYS,
        description="Kubernetes nodeSelector for these GPUs' nodes.")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=limits.MAX_TOLERATIONS,
        description="Kubernetes tolerations for these GPUs' nodes.")

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, key: str) -> str:
        try:
            return gpus.get_gpu(key).key  # canonical key, so "H100" and "h100_sxm" compare equal
        except InputError as err:
            raise rule_error(err.why) from None

    @field_validator("resource_name")
    @classmethod
    def _resource_name(cls, name: str | None) -> str | None:
        if name is not None and not _RESOURCE_NAME.match(name):
            raise rule_error("an extended resource name is <domain>/<name>, e.g. nvidia.com/gpu")
        return name

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, selector: dict[str, str]) -> dict[str, str]:
        for key, value in selector.items():
            if not _LABEL_KEY.match(key):
                raise rule_error(f"{key!r} is not a valid label key")
            if not _LABEL_VALUE.match(value):
                raise rule_error(f"{value!r} (for {key!r}) is not a valid label value")
        return selector

    @property
    def catalog_gpu(self) -> gpus.Gpu:
        return gpus.get_gpu(self.gpu)

    @property
    def effective_price_per_gpu_hour(self) -> float:
        """The spec's price, else the catalog's ($/GPU-hour)."""
        if self.price_per_gpu_hour is not None:
            return self.price_per_gpu_hour
        return self.catalog_gpu.price_per_hour

    @property
    def effective_gpus_per_node(self) -> int:
        return self.gpus_per_node or self.catalog_gpu.gpus_per_node

    @property
    def effective_resource_name(self) -> str:
        if self.resource_name is not None:
            return self.resource_name
        vendor = self.catalog_gpu.vendor
        if vendor not in DEFAULT_RESOURCE_NAMES:
            raise InputError("resourceName", None, f"no default for {vendor} GPUs; give one")
        return DEFAULT_RESOURCE_NAMES[vendor]


class HardwarePool(SpecModel):
    """Every GPU type the search may place replicas on."""

    gpus: list[GpuGroup] = Field(min_length=1, max_length=limits.MAX_GPU_GROUPS,
                                 description="GPU groups, one per GPU type.")

    @model_validator(mode="after")
    def _one_group_per_type(self) -> HardwarePool:
        seen: set[str] = set()
        for i, group in enumerate(self.gpus):
            if group.gpu in seen:
                raise rule_error(f"{group.gpu} is listed twice; merge the groups",
                                 field=f"gpus.{i}.gpu", value=group.gpu)
            seen.add(group.gpu)
        return self

    @property
    def gpu_keys(self) -> tuple[str, ...]:
        return tuple(g.gpu for g in self.gpus)

    def group(self, gpu: str) -> GpuGroup:
        """The group of a GPU key or alias; InputError listing the pool's keys if absent."""
        key = gpus.get_gpu(gpu).key
        for g in self.gpus:
            if g.gpu == key:
                return g
        raise InputError("gpu", gpu, f"not in the hardware pool; pool: {', '.join(self.gpu_keys)}")
