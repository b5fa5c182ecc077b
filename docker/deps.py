"""Print the requirements of one image target (the base dependencies plus one extra), one per
line, from pyproject.toml: the image installs its dependencies in a layer of their own, before
our code is copied, so code changes do not re-download torch."""

import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extra = sys.argv[1]
for requirement in project["dependencies"] + project["optional-dependencies"][extra]:
    print(requirement)
