"""components/storage/s3_env.py: a Kubeflow task's S3 settings under their usual names, in its own process."""

from components.storage.s3_env import adopt


def test_the_tasks_settings_get_their_aws_names_and_an_explicit_one_wins():
    env = {"FINETUNE_AWS_ACCESS_KEY_ID": "data-key", "FINETUNE_AWS_ENDPOINT_URL": "https://s3.example.com",
           "FINETUNE_AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": "http://set.by.me:8333", "MLFLOW_X": "1"}
    assert adopt(env) == ["AWS_ACCESS_KEY_ID"]
    assert env["AWS_ACCESS_KEY_ID"] == "data-key" and env["AWS_ENDPOINT_URL"] == "http://set.by.me:8333"
    assert "AWS_SECRET_ACCESS_KEY" not in env  # an optional Secret key that is empty stays unset
    assert adopt({"PATH": "/bin"}) == []
