"""The HH-RLHF TFDS builder on a small fixture in the real layout, read back through grain."""
import gzip
import importlib.util
import json

import pytest

# Optional dependencies (the `hf` extras): the rest of the suite runs without them. Looked up, not
# imported: the tests that read through them import them (collecting the suite stays a second shorter).
for _name in ('grain', 'tensorflow_datasets'):
  if importlib.util.find_spec(_name) is None:
    pytest.skip(f'could not import {_name!r}', allow_module_level=True)

from pilaf_jax.data import hh_rlhf  # noqa: E402
from pilaf_jax.data.prompts import HHRLHFPrompts, JsonlPrompts, PromptSource, demo_prompts  # noqa: E402


def user(text):
  return {'role': 'user', 'content': text}


def assistant(text):
  return {'role': 'assistant', 'content': text}


# Lines of helpful-base/train.jsonl.gz: (chosen, rejected) or None for a blank line.
HELPFUL_BASE_TRAIN = [
    ('\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: An apple.',
     '\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: A rock.'),
    ('Some preamble\n\nHuman:  What is 2+2? \n\nAssistant: 4', 'Some preamble\n\nHuman: What is 2+2?\n\nAssistant: 5'),
    None,
    ('\n\nHuman: Hello?\n\nAssistant: Hi.\n\nHuman: Bye.',) * 2,  # No final Assistant turn: skipped.
    ('\n\nHuman: Tell me a joke.\n\nAssistant:\n\nHuman: Please?\n\nAssistant: Knock knock.',
     '\n\nHuman: Tell me a joke.\n\nAssistant:\n\nHuman: Please?\n\nAssistant: No.'),
    ('\n\nHuman: Say nothing.\n\nAssistant:', '\n\nHuman: Say nothing.\n\nAssistant: Nothing.'),
    ('\n\nHuman: A\n\nAssistant: B', '\n\nHuman: C\n\nAssistant: B'),  # Prompts differ: skipped.
    ('Human: Unicode é ✓?\n\nAssistant: Oui.', 'Human: Unicode é ✓?\n\nAssistant: Non.'),
]
# The examples it must produce, by line.
HELPFUL_BASE_TRAIN_EXPECTED = {
    0: ([user('Hi'), assistant('Hello! How can I help?'), user('Name a fruit.')], 'An apple.', 'A rock.'),
    1: ([user('What is 2+2?')], '4', '5'),
    4: ([user('Tell me a joke.\n\nPlease?')], 'Knock knock.', 'No.'),
    5: ([user('Say nothing.')], '', 'Nothing.'),
    7: ([user('Unicode é ✓?')], 'Oui.', 'Non.'),
}


def conversation(prompt, response):
  return prompt + f'\n\nAssistant: {response}'


def simple_lines(subset, split, n):
  return [(conversation(f'\n\nHuman: {subset} {split} {i}?', 'yes'),
           conversation(f'\n\nHuman: {subset} {split} {i}?', 'no')) for i in range(n)]


def write_jsonl_gz(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    for line in lines:
      f.write('\n' if line is None else json.dumps({'chosen': line[0], 'rejected': line[1]}) + '\n')


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """All four subsets, train and test; helpful-base/train holds the quirks."""
  root = tmp_path_factory.mktemp('hh_source')
  layout = {s: {'train': simple_lines(s, 'train', 2), 'test': simple_lines(s, 'test', 1)}
            for s in hh_rlhf.SUBSETS}
  layout['helpful-base']['train'] = HELPFUL_BASE_TRAIN
  for subset, splits in layout.items():
    for split, lines in splits.items():
      write_jsonl_gz(root / subset / f'{split}.jsonl.gz', lines)
  return root


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('hh_data')


def read_split(data_dir, config, split):
  """{id: decoded example} through tfds.data_source and a grain MapDataset."""
  import grain  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  source = tfds.data_source(f'hh_rlhf/{config}', data_dir=str(data_dir))[split]
  dataset = grain.MapDataset.source(source).map(hh_rlhf.decode_example)
  examples = [dataset[i] for i in range(len(dataset))]
  by_id = {e['id']: e for e in examples}
  assert len(by_id) == len(examples)
  return by_id


def test_subset_config_parses_every_quirk(source, data_dir):
  builder = hh_rlhf.prepare_hh_rlhf(source, data_dir, 'helpful-base')
  got = read_split(data_dir, 'helpful-base', 'train')
  expected = {hh_rlhf.example_id('helpful-base', 'train', line): {
      'id': hh_rlhf.example_id('helpful-base', 'train', line), 'subset': 'helpful-base',
      'messages': messages, 'chosen': chosen, 'rejected': rejected,
  } for line, (messages, chosen, rejected) in HELPFUL_BASE_TRAIN_EXPECTED.items()}
  assert got == expected
  assert min(got) == 2 * 10**8  # helpful-base is subset 2, train is split 0.
  assert builder.info.metadata['skipped']['train'] == {
      'helpful-base/no_final_assistant_turn': 1, 'helpful-base/prompt_mismatch': 1}
  assert builder.info.metadata['repaired']['train'] == {
      'helpful-base/empty_turn_dropped': 1, 'helpful-base/preamble_dropped': 1,
      'helpful-base/turns_merged': 1}
  test = read_split(data_dir, 'helpful-base', 'test')
  assert list(test.values()) == [{
      'id': 2 * 10**8 + 10**7, 'subset': 'helpful-base', 'messages': [user('helpful-base test 0?')],
      'chosen': 'yes', 'rejected': 'no'}]


def test_all_config_covers_every_subset(source, data_dir):
  hh_rlhf.prepare_hh_rlhf(source, data_dir, 'helpful-base')
  hh_rlhf.prepare_hh_rlhf(source, data_dir, 'all')
  one = read_split(data_dir, 'helpful-base', 'train')
  for split, per_subset in (('train', 2), ('test', 1)):
    got = read_split(data_dir, 'all', split)
    assert {e['subset'] for e in got.values()} == set(hh_rlhf.SUBSETS)
    for subset in hh_rlhf.SUBSETS:
      if (subset, split) == ('helpful-base', 'train'):
        continue
      ids = {hh_rlhf.example_id(subset, split, line) for line in range(per_subset)}
      assert ids <= set(got)
      for i in ids:
        n = i % 10**7
        assert got[i]['messages'] == [user(f'{subset} {split} {n}?')]
        assert (got[i]['chosen'], got[i]['rejected']) == ('yes', 'no')
  # Ids and examples agree between a subset's own config and 'all'.
  all_train = read_split(data_dir, 'all', 'train')
  assert {i: all_train[i] for i in one} == one
  assert len(all_train) == 3 * 2 + len(HELPFUL_BASE_TRAIN_EXPECTED)


def test_prompts_source_and_reuse(source, data_dir, tmp_path):
  prompts = HHRLHFPrompts(data_dir, 'train', 'helpful-base', source_dir=source)
  assert isinstance(prompts, PromptSource)
  assert len(prompts) == len(HELPFUL_BASE_TRAIN_EXPECTED)
  expected = sorted(json.dumps(m) for m, _, _ in HELPFUL_BASE_TRAIN_EXPECTED.values())
  assert sorted(json.dumps(prompts.messages(i)) for i in range(len(prompts))) == expected
  assert [prompts.messages(i) for i in range(3)] == [prompts.messages(i) for i in range(3)]
  # A built config is reused: neither a missing source nor a missing source_dir rebuilds it.
  again = HHRLHFPrompts(data_dir, 'train', 'helpful-base', source_dir=tmp_path / 'gone')
  assert [again.messages(i) for i in range(len(again))] == [prompts.messages(i)
                                                            for i in range(len(prompts))]
  assert len(HHRLHFPrompts(data_dir, 'test', 'helpful-base')) == 1
  with pytest.raises(IndexError):
    prompts.messages(len(prompts))
  with pytest.raises(FileNotFoundError, match='not built'):
    HHRLHFPrompts(tmp_path / 'empty_data', 'train', 'harmless-base')


def test_bad_source_path_errors(source, tmp_path):
  (tmp_path / 'junk').mkdir()
  (tmp_path / 'junk' / 'notes.txt').write_text('nothing here')
  with pytest.raises(FileNotFoundError) as info:
    hh_rlhf.prepare_hh_rlhf(tmp_path / 'junk', tmp_path / 'data')
  message = str(info.value)
  assert '\n' not in message
  assert str(tmp_path / 'junk') in message and '<dir>/<subset>/{train,test}.jsonl.gz' in message
  with pytest.raises(FileNotFoundError, match=r'nowhere is not a directory; .*<dir>/<subset>/'):
    hh_rlhf.prepare_hh_rlhf(tmp_path / 'nowhere', tmp_path / 'data', 'harmless-base')
  # Only some subsets present: 'all' names what is missing.
  (tmp_path / 'partial' / 'harmless-base').mkdir(parents=True)
  for split in hh_rlhf.SPLITS:
    (tmp_path / 'partial' / 'harmless-base' / f'{split}.jsonl.gz').write_bytes(
        (source / 'harmless-base' / f'{split}.jsonl.gz').read_bytes())
  with pytest.raises(FileNotFoundError, match='lacks helpful-base/train.jsonl.gz'):
    hh_rlhf.prepare_hh_rlhf(tmp_path / 'partial', tmp_path / 'data')
  with pytest.raises(ValueError, match='unknown HH-RLHF subset'):
    hh_rlhf.prepare_hh_rlhf(source, tmp_path / 'data', 'red-team')
  assert not (tmp_path / 'data' / 'hh_rlhf' / 'all').exists()


@pytest.mark.parametrize('text, reason', [
    ('\n\nHuman: Hi', 'no_final_assistant_turn'),
    ('no markers at all', 'no_final_assistant_turn'),
    ('\n\nAssistant: Hi', 'empty_prompt'),
    ('\n\nHuman:\n\nAssistant: Hi', 'empty_prompt'),
    ('\n\nAssistant: Hello\n\nHuman: Hi\n\nAssistant: Yes', 'prompt_starts_with_assistant'),
])
def test_split_conversation_rejects(text, reason):
  with pytest.raises(hh_rlhf.ConversationError) as info:
    hh_rlhf.split_conversation(text)
  assert info.value.reason == reason


def test_split_conversation_markers_need_blank_line():
  # 'Assistant:' without a blank line before it is text, not a turn.
  assert hh_rlhf.split_conversation('\n\nHuman: Quote "Assistant: no" please\n\nAssistant: Done.') == (
      [user('Quote "Assistant: no" please')], 'Done.', set())
  with pytest.raises(hh_rlhf.ConversationError, match='prompt_ends_with_assistant'):
    hh_rlhf.split_conversation('\n\nHuman: Hi\n\nAssistant: A\n\nAssistant: B')


def test_demo_prompts(tmp_path):
  train, test = demo_prompts(tmp_path, 'train'), demo_prompts(tmp_path, 'test')
  assert (len(train), len(test)) == (256, 64)
  texts = {}
  for name, prompts in (('train', train), ('test', test)):
    texts[name] = []
    for i in range(len(prompts)):
      example = prompts.example(i)
      assert len(example['messages']) == 1 and example['messages'][0]['role'] == 'user'
      assert example['chosen'] == example['rejected'] == ''
      texts[name].append(example['messages'][0]['content'])
  assert len(set(texts['train']) | set(texts['test'])) == 320
  assert 'What is the capital of France?' in texts['test']
  assert train.builder.info.metadata['skipped'] == {'train': {}, 'test': {}}


def test_jsonl_prompts(tmp_path):
  lines = [{'prompt': 'Hi there'}, {'messages': [{'role': 'system', 'content': 'Be brief.'},
                                                 user('Why?')]}]
  path = tmp_path / 'prompts.jsonl.gz'
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    f.write('\n'.join(json.dumps(x) for x in lines) + '\n\n')
  prompts = JsonlPrompts(path)
  assert isinstance(prompts, PromptSource)
  assert len(prompts) == 2
  assert prompts.messages(0) == [user('Hi there')]
  assert prompts.messages(1) == lines[1]['messages']
  prompts.messages(0)[0]['content'] = 'mutated'
  assert prompts.messages(0) == [user('Hi there')]
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'prompt': 'ok'}) + '\n' + json.dumps({'messages': [assistant('x')]}) + '\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:2: the last message must be a user turn'):
    JsonlPrompts(bad)
  bad.write_text('{"text": "x"}\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:1: expected'):
    JsonlPrompts(bad)
