"""MLflow models-from-code entry: loading a registered model runs this file; nothing is unpickled."""

import mlflow

from components.models.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
