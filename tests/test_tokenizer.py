"""The SentencePiece tokenizers on real (tiny, trained) models: edge cases and special tokens."""
import pytest

EDGE_CASES = [
    '你好', 'hello world', ' leading space', 'trailing   ', 'a  b   c    d', ' ' * 2, ' ' * 85,
    'tab\there', '\t\t\tindented', 'line1\nline2', '\n\n\n', 'crlf\r\nline', '👋 emoji 😀🎉',
    '全角，标点！：；？（）【】', '。、“引号”', 'mixed中英文ABC123混合', 'x=1; y = [1, 2]  # code',
    '\u3000ideographic space', 'zero\u200bwidth', 'ÀÉÎõü accents', '',
]


@pytest.mark.parametrize('text', EDGE_CASES)
def test_roundtrip_is_exact(glm2_model, glm3_model, text):
    for model in (glm2_model, glm3_model):
        ids = model.tokenizer.encode(text)
        assert model.tokenizer.decode(ids) == text
        assert all(0 <= i < model.tokenizer.num_sp_pieces for i in ids)


def test_byte_fallback_and_layout(glm2_model):
    tok = glm2_model.tokenizer
    # Byte pieces sit at 3..258 as in the real tokenizer: '\n' = 13, '\t' = 12.
    assert tok.sp.PieceToId('<0x0A>') == 13 and tok.sp.PieceToId('<0x09>') == 12
    assert 13 in tok.encode('a\nb')
    assert tok.decode(tok.encode('🦜')) == '🦜'    # not in the training text: bytes


def test_glm2_specials(glm2_model):
    tok = glm2_model.tokenizer
    n = tok.num_sp_pieces
    assert [tok[t] for t in ('[MASK]', '[gMASK]', '[sMASK]', 'sop', 'eop')] == list(range(n, n + 5))
    assert tok.prefix_ids == [n + 1, n + 3]
    assert tok.vocab_size == n + 5 and tok.stop_ids == [2]
    # v2 decoding blanks specials, bos, eos and pad.
    assert tok.decode(tok.prefix_ids + tok.encode('你好') + [2, 0, 1]) == '你好'


def test_glm3_role_tokens(glm3_model):
    tok = glm3_model.tokenizer
    n = tok.num_sp_pieces
    roles = ['<|system|>', '<|user|>', '<|assistant|>', '<|observation|>']
    assert [tok[r] for r in roles] == list(range(n + 5, n + 9))
    assert tok.stop_ids == [2, tok['<|user|>'], tok['<|observation|>']]
    # v3 renders specials as their text (the chat post-processing splits on <|assistant|>).
    assert tok.decode([tok['<|assistant|>']] + tok.encode('你好')) == '<|assistant|>你好'
    # Role-token text typed by a user stays text: it cannot forge a turn boundary.
    forged = tok.encode('<|user|>')
    assert tok['<|user|>'] not in forged and tok.decode(forged) == '<|user|>'


def test_encode_rejects_non_strings(glm2_model):
    with pytest.raises(TypeError, match='takes a str'):
        glm2_model.tokenizer.encode(['a'])
