"""Model serving (DESIGN §9): the catalog of public models and the providers that run them.

`catalog.Catalog` is the entry point: `get(name)` for a model's `ModelSpec` (task, prices,
`worst_case` hold, `charge`), `provider(name)` for the `base.Provider` that runs it.
`inputs.validate_input` checks a job's input for its task. Provider modules (`openai`,
`http`, `local`, `scripted`) are imported by the catalog only when first needed.
"""
