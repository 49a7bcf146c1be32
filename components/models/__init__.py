"""Models and zoos: the networks the pipeline fine-tunes and where their pretrained weights come from.

    architectures.py   building a torchvision network, loading weights into it, its output layer, freezing
    zoo.py             pretrained weights from a file, torchvision, https, S3 or the MLflow registry, cached
    serving.py         the fine-tuned network as the registry serves it: image bytes in, class names out
                       (an MLflow pyfunc; pyfunc_entry.py is what loading it runs)
"""
