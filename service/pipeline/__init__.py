"""The inspection pipeline and the record it publishes per frame."""

from service.pipeline.record import STAGES, InspectionRecord, StageTimes
from service.pipeline.runner import Handoff, Pipeline, PipelineError, TriggerTicket

__all__ = ["STAGES", "Handoff", "InspectionRecord", "Pipeline", "PipelineError", "StageTimes", "TriggerTicket"]
