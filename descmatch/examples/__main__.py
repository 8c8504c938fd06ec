from . import write_examples

write_examples()
