import pytest

from edgert.errors import BadRequestError
from edgert.gguf_file import validate_gguf
from edgert.serving.prompt import formatter_for


def gemma_turns():
    return formatter_for("gemma-turns", None, bos_token="<bos>", eos_token="<eos>")


def test_gemma_turn_format_matches_the_published_format() -> None:
    text = gemma_turns().render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_roles_must_alternate() -> None:
    with pytest.raises(BadRequestError, match="alternate"):
        gemma_turns().render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_gemma4_template_from_the_gguf_renders_gemma4_turns(tiny_gguf) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(tiny_gguf)
    template = reader.fields["tokenizer.chat_template"].contents()
    assert validate_gguf(tiny_gguf).architecture == "gemma4"
    formatter = formatter_for("gguf", template, bos_token="<bos>", eos_token="<eos>")
    text = formatter.render([{"role": "system", "content": "You are a test."}, {"role": "user", "content": "Hi"}])
    assert text == (
        "<bos><|turn>system\nYou are a test.<turn|>\n<|turn>user\nHi<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
