"""An HTML template for `dvc plots show` with the Vega libraries inlined, so plots render offline.

    python infra/plots/offline_template.py .dvc/plots/offline.html   # make setup runs this

DVC's default page loads vega, vega-lite and vega-embed from a CDN; a template without the
`{scripts}` placeholder keeps them out, and this one carries the libraries from infra/plots/
node_modules (`npm ci` there installs the versions pinned in package-lock.json).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARIES = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>DVC Plot</title>
    {refresh_tag}
{libraries}
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def main(out: str) -> int:
    scripts = []
    for library in LIBRARIES:
        code = (HERE / "node_modules" / library).read_text(encoding="utf8")
        code = code.replace("</script", "<\\/script")  # cannot end the inline element early
        scripts.append(f"    <script>{code}</script>")
    page = PAGE.format(refresh_tag="{refresh_tag}", libraries="\n".join(scripts))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(page, encoding="utf8")
    tmp.replace(out)
    print(f"plots: offline template {out} (vega, vega-lite, vega-embed inlined)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
