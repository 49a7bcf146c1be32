"""DEMO ONLY: the embedded default's data and model zoo, made offline from what packages ship.

    digits.py   scikit-learn's handwritten digits as PNG files: a source task and the target task
    zoo.py      a network trained from scratch on the source task, published as a zoo checkpoint

Real projects skip both: data.source and pretrained.uri point at their own data and zoo. Kept out of
components/, so the product's stages do not depend on it, nor it on their edits more than it must.
"""


def command_line(argv, description: str, paths: dict[str, str]):
    """A demo command's paths (`paths`: each one's name and help), and params.yaml with its `demo` section
    (or a configuration error)."""
    import argparse

    from components.config import ConfigError, load_params

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file (section: demo)")
    for name, text in paths.items():  # one each: argparse's help fails on nargs=2 with a tuple metavar
        parser.add_argument(name.lower(), metavar=name, help=text)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if params.demo is None:
        raise ConfigError(f"{args.params}: no `demo` section: the demo stages need it")
    return [getattr(args, name.lower()) for name in paths], params
