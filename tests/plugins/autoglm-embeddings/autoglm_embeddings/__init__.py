"""An `embedding` task type: a text in, a unit vector out (the mean of the model's last hidden layer).

Producers import only the schemas below; workers import ``Handler`` (named by ``EMBEDDING.handler``),
which the fleet calls in the consumer process (``prepare``) and in the engine core (``run``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.schemas import TaskRequestBase
from shared.task_types import TaskTypeSpec


class EmbeddingRequest(TaskRequestBase):
    task_type: Literal["embedding"] = "embedding"
    text: str = Field(min_length=1, max_length=8000)


class EmbeddingOutput(BaseModel):
    embedding: list[float]
    dim: int


EMBEDDING = TaskTypeSpec("embedding", EmbeddingRequest, EmbeddingOutput, handler="autoglm_embeddings:Handler")


class Handler:
    """For the transformers backend: its request side has ``.tokenizer`` and ``.context``; its batch
    side ``.model``, ``.tokenizer`` and ``.device``."""

    def prepare(self, request_side: Any, request: EmbeddingRequest) -> Any:
        from workers.wire import PreparedTask

        ids = request_side.tokenizer(request.text, add_special_tokens=False)["input_ids"][: request_side.context]
        return PreparedTask(request, ids, rows=1, width=len(ids), prompt_tokens=len(ids))

    def run(self, batch_side: Any, items: list[Any]) -> list[Any]:
        import torch

        from shared.schemas import Usage
        from workers.wire import Answer

        width = max(len(item.payload) for item in items)
        ids = torch.full((len(items), width), batch_side.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, : len(item.payload)] = torch.tensor(item.payload)
            mask[row, : len(item.payload)] = 1
        with torch.inference_mode():
            hidden = batch_side.model(input_ids=ids.to(batch_side.device), attention_mask=mask.to(batch_side.device),
                                      output_hidden_states=True).hidden_states[-1].float()
        weights = mask.to(hidden.device).unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1).cpu()
        return [Answer(EmbeddingOutput(embedding=vector.tolist(), dim=vector.numel()), Usage(prompt_tokens=len(item.payload)))
                for vector, item in zip(pooled, items, strict=True)]
