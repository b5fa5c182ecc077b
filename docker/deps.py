"""Print the requirements of one image target (the base dependencies plus one extra), one per
line, from pyproject.toml: the image installs its dependencies in a layer of their own, before
our code is copied, so code changes do not re-download torch. With --no-deps: the extra's
data wheels ([tool.kubetune.no-deps]), installed without their own dependencies."""

import sys
import tomllib

pyproject = tomllib.load(open("pyproject.toml", "rb"))
project = pyproject["project"]
extra = sys.argv[1]
if "--no-deps" in sys.argv[2:]:
    for requirement in pyproject.get("tool", {}).get("kubetune", {}).get("no-deps", {}).get(
            extra, []):
        print(requirement)
else:
    for requirement in project["dependencies"] + project["optional-dependencies"][extra]:
        print(requirement)
