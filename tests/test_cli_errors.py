"""The command line refuses bad input with one clear message and status 2, before decoding."""

import pytest

from jaxcombine import cli


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt-ids", "1,x,3"], "cannot parse token ids"),
        (["--prompt-ids", ""], "prompt is empty"),
        (["--prompt-ids", ",".join(["5"] * 65)], "more than the model's context of 64"),
        (["--prompt-ids", "1,99999"], "outside the vocabulary"),
        (["--prompt-ids", "1,2", "--temperature", "0.7", "--top-p", "1.5"], "top_p must be in"),
        (["--prompt-ids", "1,2", "--greedy", "--temperature", "0.5"], "contradict"),
        (["--prompt-ids", "1,2", "--top-k", "5"], "need sampling"),
        (["--prompt-ids", "1,2", "--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_generate_bad_input(tiny_models, capsys, args, message):
    code = cli.main(["generate", "--model", str(tiny_models["llama_gqa"]), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_missing_model_dir(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    assert "model directory does not exist" in capsys.readouterr().err


def test_score_missing_text_file(tiny_models, tmp_path, capsys):
    code = cli.main(
        [
            "score",
            "--model",
            str(tiny_models["qwen2"]),
            "--text-file",
            str(tmp_path / "missing.txt"),
        ]
    )
    assert code == 2
    assert "text file does not exist" in capsys.readouterr().err


def test_score_too_short_text(tiny_models, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("")
    code = cli.main(["score", "--model", str(tiny_models["qwen2"]), "--text-file", str(text)])
    assert code == 2
    assert "need at least 2 tokens" in capsys.readouterr().err
