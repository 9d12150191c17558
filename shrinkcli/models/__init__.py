"""Model zoo: IResNet teachers (insightface-compatible, plus r90) and lightweight students."""

from shrinkcli.models.registry import FaceOutput, create_model, list_models, model_family, register_model

__all__ = ["FaceOutput", "create_model", "list_models", "model_family", "register_model"]
