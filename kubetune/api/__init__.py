"""kubetune.io/v1alpha1: the FineTuneJob and LoRAAdapter API models (one source of truth)."""

from .common import API_VERSION, GROUP, VERSION
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from .loraadapter import LoRAAdapter, LoRAAdapterSpec, LoRAAdapterStatus

__all__ = ["API_VERSION", "GROUP", "VERSION", "FineTuneJob", "FineTuneJobSpec",
           "FineTuneJobStatus", "LoRAAdapter", "LoRAAdapterSpec", "LoRAAdapterStatus"]
