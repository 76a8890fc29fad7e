"""The runnable example in docs/api.md runs and prints what the docs say."""
import os
import re


def test_api_example_runs(capsys):
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "docs/api.md", "exec"), {})
    kept = [int(k) for k in re.findall(r"kept (\d+) of", capsys.readouterr().out)]
    assert kept == [256, 128, 128, 256]
