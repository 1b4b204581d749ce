from edgert.serving.tokens import TextAssembler


def feed_all(assembler: TextAssembler, pieces: list[bytes]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        step = assembler.feed(piece)
        out.append(step.delta)
        if step.stopped:
            return "".join(out), True
    out.append(assembler.flush())
    return "".join(out), False


def test_multibyte_character_split_across_tokens_is_held_until_complete() -> None:
    raw = "日本".encode()
    assembler = TextAssembler()
    first = assembler.feed(raw[:2])
    assert first.delta == ""
    second = assembler.feed(raw[2:4])
    assert second.delta == "日"
    assert assembler.feed(raw[4:]).delta == "本"


def test_stop_string_spanning_tokens_is_not_emitted() -> None:
    text, stopped = feed_all(TextAssembler(("END",)), [b"hello E", b"N", b"D and more"])
    assert stopped
    assert text == "hello "


def test_prefix_of_stop_string_is_released_when_it_turns_out_not_to_be_one() -> None:
    assembler = TextAssembler(("END",))
    assert assembler.feed(b"abc EN").delta == "abc "
    assert assembler.feed(b"X").delta == "ENX"


def test_held_text_is_flushed_at_end() -> None:
    text, stopped = feed_all(TextAssembler(("</s>",)), [b"done </"])
    assert not stopped
    assert text == "done </"


def test_earliest_of_several_stop_strings_wins() -> None:
    text, stopped = feed_all(TextAssembler(("zz", "b")), [b"aaab zz"])
    assert stopped
    assert text == "aaa"


def test_invalid_utf8_is_replaced_not_raised() -> None:
    text, _ = feed_all(TextAssembler(), [b"ok \xff\xfe end"])
    assert text.startswith("ok ")
    assert "\ufffd" in text
