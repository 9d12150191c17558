"""ShrinkTeaNet distillation: the engine task (`DistillTask`) and the teacher-output cache."""

from __future__ import annotations

from shrinkcli.distill.cache import TeacherCache, cache_key, open_or_build
from shrinkcli.distill.task import CacheRequest, DistillTask

__all__ = ["CacheRequest", "DistillTask", "TeacherCache", "cache_key", "open_or_build"]
