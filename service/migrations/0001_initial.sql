-- The whole data model of DESIGN.md. Postgres is the source of truth; the constraints below enforce the invariants
-- the code relies on, so a bug or a race in the code fails loudly instead of corrupting state.

CREATE TABLE api_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    role        text NOT NULL CHECK (role IN ('user', 'operator', 'admin')),
    key_hash    text NOT NULL UNIQUE,
    key_prefix  text NOT NULL,                 -- first characters of the key, to recognise it in listings
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    flagged_at  timestamptz,                   -- set by an operator: feedback kept but excluded from training
    flag_reason text
);

CREATE TABLE conversations (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner       bigint NOT NULL REFERENCES api_keys (id),
    title       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz                    -- soft delete: the messages still back the feedback they carry
);
CREATE INDEX conversations_owner_created ON conversations (owner, created_at DESC) WHERE deleted_at IS NULL;

CREATE TABLE training_runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status       text NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    algorithm    text NOT NULL CHECK (algorithm IN ('auto', 'sft', 'dpo', 'kto', 'rl')),
    trigger      text NOT NULL DEFAULT 'manual',   -- threshold | interval | manual
    requested_by text,
    worker       text,                             -- host:pid of the worker that runs it, for crash recovery
    data_until   timestamptz,                      -- feedback watermark: newer feedback is for the next run
    counts       jsonb NOT NULL DEFAULT '{}',
    params       jsonb NOT NULL DEFAULT '{}',
    metrics      jsonb NOT NULL DEFAULT '{}',
    progress     jsonb NOT NULL DEFAULT '{}',
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz,
    started_at   timestamptz,
    finished_at  timestamptz,
    CHECK ((status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CHECK (status <> 'failed' OR error IS NOT NULL)
);
-- One trainer at a time, whatever the Redis lock says.
CREATE UNIQUE INDEX training_runs_one_running ON training_runs ((true)) WHERE status = 'running';

CREATE TABLE adapters (
    version        integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,   -- served as flywheel:v<version>
    name           text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    base_model     text NOT NULL,
    parent_version integer REFERENCES adapters (version),
    algorithm      text NOT NULL CHECK (algorithm IN ('sft', 'dpo', 'kto', 'rl', 'auto', 'import')),
    status         text NOT NULL DEFAULT 'training' CHECK (status IN (
                       'training', 'candidate', 'rejected', 'failed', 'canary', 'production', 'retired', 'rolled_back')),
    canary_percent smallint CHECK (canary_percent BETWEEN 1 AND 50),
    path           text,
    sha256         text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes     bigint CHECK (size_bytes > 0),
    metrics        jsonb NOT NULL DEFAULT '{}',
    run_id         bigint REFERENCES training_runs (id),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- Anything that can be served or promoted has verified files on disk.
    CHECK (status IN ('training', 'failed', 'rejected')
           OR (path IS NOT NULL AND sha256 IS NOT NULL AND size_bytes IS NOT NULL)),
    CHECK ((status = 'canary') = (canary_percent IS NOT NULL))
);
-- At most one production (none: the base model serves) and at most one canary.
CREATE UNIQUE INDEX adapters_one_production ON adapters ((true)) WHERE status = 'production';
CREATE UNIQUE INDEX adapters_one_canary ON adapters ((true)) WHERE status = 'canary';
CREATE INDEX adapters_status ON adapters (status);

CREATE TABLE messages (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    conversation_id   uuid NOT NULL REFERENCES conversations (id),
    parent_id         uuid REFERENCES messages (id),    -- regenerations are siblings: same parent
    role              text NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content           text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    adapter_version   integer REFERENCES adapters (version),   -- NULL: the base model answered
    model             text,                             -- the model name the client asked for
    sampling          jsonb,
    finish_reason     text CHECK (finish_reason IN ('stop', 'length', 'abort', 'error')),
    prompt_tokens     integer CHECK (prompt_tokens >= 0),
    completion_tokens integer CHECK (completion_tokens >= 0),
    latency_ms        integer CHECK (latency_ms >= 0),
    CHECK (role = 'assistant' OR (adapter_version IS NULL AND completion_tokens IS NULL))
);
CREATE INDEX messages_conversation ON messages (conversation_id, created_at);
CREATE INDEX messages_parent ON messages (parent_id);
CREATE INDEX messages_adapter_created ON messages (adapter_version, created_at) WHERE role = 'assistant';

CREATE TABLE feedback (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id           uuid NOT NULL REFERENCES messages (id),
    owner                bigint NOT NULL REFERENCES api_keys (id),
    kind                 text NOT NULL CHECK (kind IN ('thumb', 'rating', 'edit', 'comparison')),
    value                smallint,
    content              text,
    preferred_message_id uuid REFERENCES messages (id),
    comment              text,
    tags                 text[] NOT NULL DEFAULT '{}',
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    retracted_at         timestamptz,          -- DELETE retracts: kept for the audit, excluded everywhere else
    -- A new vote replaces the old one (upsert), never duplicates it.
    UNIQUE (message_id, owner, kind),
    CHECK (CASE kind
        WHEN 'thumb'      THEN value IN (-1, 1) AND content IS NULL AND preferred_message_id IS NULL
        WHEN 'rating'     THEN value BETWEEN 1 AND 5 AND content IS NULL AND preferred_message_id IS NULL
        WHEN 'edit'       THEN value IS NULL AND length(content) > 0 AND preferred_message_id IS NULL
        WHEN 'comparison' THEN value IS NULL AND content IS NULL AND preferred_message_id IS NOT NULL
    END)
);
CREATE INDEX feedback_updated ON feedback (updated_at);
CREATE INDEX feedback_preferred ON feedback (preferred_message_id) WHERE preferred_message_id IS NOT NULL;

CREATE TABLE adapter_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version     integer NOT NULL REFERENCES adapters (version),
    from_status text,
    to_status   text NOT NULL,
    actor       text NOT NULL,
    reason      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX adapter_events_version ON adapter_events (version, at);
