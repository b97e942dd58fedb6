//! Collect, local half: multi-document YAML manifests from files and
//! directories into a [`Snapshot`].
//!
//! A document that cannot be understood at all (bad YAML, unknown kind, no
//! name) fails the whole load: rendering from a partial view could remove
//! what the unread part declares. A well-formed object that breaks its
//! schema or CEL rules is kept as [`InvalidObject`], so only the instances it
//! targets are held back.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::Value;

use crate::crd::{self, AgentInstance, McpServer, PluginBinding, PluginMarketplace, Scope};
use crate::engine::secrets::{self, SecretValue};
use crate::engine::shape;
use crate::engine::snapshot::{InvalidObject, ObjectKey, Snapshot};
pub use crate::host::schema::unknown_fields;
use crate::host::{schema, yaml};

/// Namespace of an object whose manifest names none, as with `kubectl apply`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Where a document came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// File path (for a kustomization, `kustomize build <dir>`); one per
    /// file, shared by its documents.
    pub file: Arc<Path>,
    /// 1-based document index in the file.
    pub document: usize,
    /// 1-based line the document starts on; 0 when the text is not a file
    /// the user wrote (a kustomization's output).
    pub line: usize,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => write!(f, "{} (document {})", self.file.display(), self.document),
            line => write!(
                f,
                "{}:{line} (document {})",
                self.file.display(),
                self.document
            ),
        }
    }
}

/// The manifests cannot be used; nothing is rendered.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A path cannot be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid YAML.
    #[error("{}: invalid YAML: {message}", .file.display())]
    Yaml {
        /// The file.
        file: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A document cannot be taken as any object.
    #[error("{source_doc}: {message}")]
    Document {
        /// Where.
        source_doc: Source,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A file is larger than [`MAX_MANIFEST_FILE_BYTES`].
    #[error(
        "{} is {size} bytes, over the limit of {limit} bytes ({} MiB) per manifest file",
        .file.display(),
        .limit / (1024 * 1024)
    )]
    FileTooLarge {
        /// The file.
        file: PathBuf,
        /// Its size (at least), in bytes.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A file holds more than [`MAX_DOCUMENTS_PER_FILE`] documents.
    #[error(
        "{}: more than {limit} YAML documents, the limit per manifest file",
        .file.display()
    )]
    TooManyDocuments {
        /// The file.
        file: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// The files together hold more than [`MAX_OBJECTS`] objects.
    #[error(
        "{}: the manifests hold more than {limit} objects, the limit for all manifest files together",
        .file.display()
    )]
    TooManyObjects {
        /// The file in which the count went over.
        file: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// A file or directory that is not for agent-env, under `--strict`.
    #[error(
        "{}: a {what}, not agent-env objects: refused under --strict (leave it out of -f; build a kustomization with -k)",
        .path.display()
    )]
    Foreign {
        /// The file or directory.
        path: PathBuf,
        /// What it is.
        what: String,
    },
    /// `-k`: kubectl cannot be run to build a kustomization.
    #[error(
        "-k {}: cannot run {kubectl:?} to build the kustomization (install kubectl, or set {} to its path)",
        .dir.display(),
        crate::host::kustomize::KUBECTL_ENV
    )]
    KubectlMissing {
        /// The kustomization directory.
        dir: PathBuf,
        /// The program tried.
        kubectl: String,
        /// Why it could not run.
        #[source]
        source: std::io::Error,
    },
    /// `-k`: the kustomization does not build.
    #[error("-k {}: `kubectl kustomize` failed: {message}", .dir.display())]
    Kustomize {
        /// The kustomization directory.
        dir: PathBuf,
        /// What kustomize said.
        message: String,
    },
    /// The same object appears twice.
    #[error("{kind} {key} is defined twice: in {first} and in {second}")]
    Duplicate {
        /// Kind.
        kind: String,
        /// namespace/name.
        key: String,
        /// First definition.
        first: Box<Source>,
        /// Second definition.
        second: Box<Source>,
    },
}

/// What happens to a field no schema declares, as the API server's
/// `fieldValidation` parameter says it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    /// The object is taken without the field and a warning names it: what
    /// the server does for a client that asks for no strictness.
    #[default]
    Warn,
    /// The object is refused: what `kubectl apply` asks for by default.
    Strict,
}

/// Kinds accepted in manifests.
pub const KINDS: &str = "AgentInstance, PluginBinding, PluginMarketplace, McpServer (agentenv.io/v1alpha1) and Secret (v1)";

/// Where the manifests are read from, and how strictly.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Manifest files or directories (read recursively).
    pub files: Vec<PathBuf>,
    /// Kustomization directories, built as Argo CD and Flux build them.
    pub kustomize: Vec<PathBuf>,
    /// What a field no schema declares does to its object; `Strict` also
    /// refuses documents and files that are not for agent-env.
    pub fields: FieldValidation,
    /// Most objects the files may hold together ([`MAX_OBJECTS`] unless lowered).
    pub max_objects: usize,
}

impl Inputs {
    /// Plain manifest paths.
    pub fn files(files: &[PathBuf], fields: FieldValidation) -> Inputs {
        Inputs {
            files: files.to_vec(),
            kustomize: Vec::new(),
            fields,
            max_objects: MAX_OBJECTS,
        }
    }

    /// Every path a change of the inputs can show up under (the
    /// kustomization directories as a whole).
    pub fn watched(&self) -> Vec<PathBuf> {
        self.files.iter().chain(&self.kustomize).cloned().collect()
    }

    /// What to read, in order: every manifest file under `files`, then each
    /// kustomization; files and directories that are not for agent-env are
    /// counted in `skipped` (or refused when strict). Each is read only
    /// when its turn comes, so one file's text is held at a time.
    fn sources(
        &self,
        skipped: &mut BTreeMap<String, usize>,
    ) -> Result<Vec<TextSource>, ManifestError> {
        let mut files = Vec::new();
        let mut foreign = Vec::new();
        for p in &self.files {
            collect_files(p, &mut files, &mut foreign)?;
        }
        // A patch a kustomization applies is part of that kustomization,
        // not an object: read alone it would be a second, partial object.
        let patches = kustomize_patches(&foreign);
        files.retain(|f| {
            if patches.is_empty() {
                return true;
            }
            let patch = std::fs::canonicalize(f).is_ok_and(|f| patches.contains(&f));
            if patch {
                foreign.push((f.clone(), "kustomize patch"));
            }
            !patch
        });
        for (path, what) in foreign {
            if self.fields == FieldValidation::Strict {
                return Err(ManifestError::Foreign {
                    path,
                    what: what.to_owned(),
                });
            }
            *skipped.entry(what.to_owned()).or_default() += 1;
        }
        Ok(files
            .into_iter()
            .map(TextSource::File)
            .chain(
                self.kustomize
                    .iter()
                    .cloned()
                    .map(TextSource::Kustomization),
            )
            .collect())
    }
}

/// Where one manifest text comes from.
enum TextSource {
    /// A manifest file.
    File(PathBuf),
    /// A kustomization directory, built.
    Kustomization(PathBuf),
}

impl TextSource {
    fn read(self) -> Result<Text, ManifestError> {
        Ok(match self {
            TextSource::File(file) => Text {
                text: read_manifest(&file)?,
                name: file,
                lines: true,
            },
            TextSource::Kustomization(dir) => Text {
                name: crate::host::kustomize::source_name(&dir),
                text: crate::host::kustomize::build(&dir)?,
                // Lines of generated output point nowhere a user can edit.
                lines: false,
            },
        })
    }
}

/// One manifest text and where it came from.
struct Text {
    /// The file, or what built the text.
    name: PathBuf,
    text: String,
    /// Whether its lines are a file's lines (worth naming in messages).
    lines: bool,
}

/// Loads every `.yaml`, `.yml` and `.json` file under the given paths (files
/// or directories, recursively, in name order).
pub fn load_paths(paths: &[PathBuf], fields: FieldValidation) -> Result<Snapshot, ManifestError> {
    load(&Inputs::files(paths, fields))
}

/// Loads the manifests of `inputs`.
pub fn load(inputs: &Inputs) -> Result<Snapshot, ManifestError> {
    load_into(inputs, Loader::with_max_objects(inputs.max_objects))
}

/// [`load`], keeping where each agent object was read ([`Snapshot::sources`]).
pub fn load_with_sources(inputs: &Inputs) -> Result<Snapshot, ManifestError> {
    load_into(
        inputs,
        Loader::with_max_objects(inputs.max_objects).keep_sources(),
    )
}

fn load_into(inputs: &Inputs, loader: Loader) -> Result<Snapshot, ManifestError> {
    let mut loader = loader.with_field_validation(inputs.fields);
    let sources = inputs.sources(&mut loader.snapshot.skipped)?;
    let fields = inputs.fields;
    each_parsed(
        sources,
        |t| Ok((check_docs(parse_yaml(&t)?, fields), t.name)),
        |(checked, file)| {
            let docs = loader.take_checked(&file, checked)?;
            loader.insert_all(Arc::new(docs))
        },
    )?;
    Ok(loader.finish())
}

/// Reads, parses and checks manifest texts on as many threads as there
/// are cores, a window of files at a time, and hands each result to `take`
/// in input order (so the first error is the one a serial load would
/// give). Parsing and checking YAML is most of loading a large fleet and
/// files are independent; at most one window of files is held at once.
fn each_parsed<T: Send>(
    sources: Vec<TextSource>,
    parse: impl Fn(Text) -> Result<T, ManifestError> + Sync,
    mut take: impl FnMut(T) -> Result<(), ManifestError>,
) -> Result<(), ManifestError> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// Files of a window: enough that its threads (started once per
    /// window, not per file) rarely wait on each other at its end.
    const WINDOW: usize = 256;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut sources = sources.into_iter().peekable();
    while sources.peek().is_some() {
        let window: Vec<Mutex<Option<TextSource>>> = (sources.by_ref().take(WINDOW))
            .map(|s| Mutex::new(Some(s)))
            .collect();
        let results: Vec<Mutex<Option<Result<T, ManifestError>>>> =
            window.iter().map(|_| Mutex::new(None)).collect();
        // Each thread takes the next file not taken yet: a large file holds
        // up one thread, not a share of the window.
        let next = AtomicUsize::new(0);
        let work = || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = window.get(i) else { break };
            let source = slot.lock().expect("a slot's lock is never poisoned").take();
            let result = (source.expect("each file is taken once").read()).and_then(&parse);
            *results[i].lock().expect("a slot's lock is never poisoned") = Some(result);
        };
        std::thread::scope(|scope| {
            for _ in 1..threads.min(window.len()) {
                scope.spawn(work);
            }
            work();
        });
        for r in results {
            let r = r.into_inner().expect("a slot's lock is never poisoned");
            take(r.expect("every file of the window is parsed")?)?;
        }
    }
    Ok(())
}

/// The checked documents of every manifest file read last time, by file.
#[derive(Default)]
pub struct ManifestCache {
    files: HashMap<PathBuf, CachedFile>,
}

struct CachedFile {
    hash: u64,
    /// Shared with the next cache: each reload copies a document once, into the snapshot.
    docs: Arc<Vec<(Prepared, Source)>>,
}

/// One file's documents: checked before (its text unchanged), or parsed and checked now.
enum FileDocs {
    Checked(Arc<Vec<(Prepared, Source)>>),
    Parsed(Vec<(Result<Prepared, ManifestError>, Source)>),
}

fn text_hash(text: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    // A fixed-key hash: equal texts hash equal within the process, which is
    // all a cache of files this process read needs.
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(text)
}

/// [`load`], reusing the checked documents of files (and kustomization
/// outputs) whose text is unchanged since the last call with the same cache.
/// The cache is replaced only when the load succeeds.
pub fn load_cached(inputs: &Inputs, cache: &mut ManifestCache) -> Result<Snapshot, ManifestError> {
    let mut loader =
        Loader::with_max_objects(inputs.max_objects).with_field_validation(inputs.fields);
    let mut next = ManifestCache::default();
    let sources = inputs.sources(&mut loader.snapshot.skipped)?;
    let known = &*cache;
    each_parsed(
        sources,
        |t| {
            let hash = text_hash(&t.text);
            let docs = match known.files.get(&t.name).filter(|c| c.hash == hash) {
                Some(c) => FileDocs::Checked(Arc::clone(&c.docs)),
                None => FileDocs::Parsed(check_docs(parse_yaml(&t)?, inputs.fields)),
            };
            Ok((t.name, hash, docs))
        },
        |(file, hash, docs)| loader.add_file_cached(file, hash, docs, &mut next),
    )?;
    *cache = next;
    Ok(loader.finish())
}

/// Reads one manifest file, refusing one over [`MAX_MANIFEST_FILE_BYTES`]
/// before reading it (and one that grows past it while being read).
fn read_manifest(file: &Path) -> Result<String, ManifestError> {
    use std::io::Read;
    let read_err = |source| ManifestError::Read {
        path: file.to_owned(),
        source,
    };
    let too_large = |size| ManifestError::FileTooLarge {
        file: file.to_owned(),
        size,
        limit: MAX_MANIFEST_FILE_BYTES,
    };
    let f = std::fs::File::open(file).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    if size > MAX_MANIFEST_FILE_BYTES {
        return Err(too_large(size));
    }
    let mut text = String::with_capacity(size as usize);
    f.take(MAX_MANIFEST_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_MANIFEST_FILE_BYTES {
        return Err(too_large(text.len() as u64));
    }
    Ok(text)
}

/// The documents of one manifest text, parsed, each with where it starts.
fn parse_yaml(t: &Text) -> Result<Vec<(Value, Source)>, ManifestError> {
    let (file, text) = (t.name.as_path(), t.text.as_str());
    let docs = yaml::documents(text, yaml_budget(text.len())).map_err(|e| match e {
        yaml::YamlError::TooManyDocuments { limit } => ManifestError::TooManyDocuments {
            file: file.to_owned(),
            limit,
        },
        yaml::YamlError::Invalid(message) => ManifestError::Yaml {
            file: file.to_owned(),
            message,
        },
    })?;
    let lines = if t.lines {
        document_lines(text)
    } else {
        Vec::new()
    };
    let file: Arc<Path> = file.into();
    let docs: Vec<(Value, Source)> = docs
        .into_iter()
        .enumerate()
        .filter(|(_, d)| !d.is_null())
        .map(|(i, doc)| {
            let source = Source {
                file: Arc::clone(&file),
                document: i + 1,
                line: lines.get(i).copied().unwrap_or(0),
            };
            (doc, source)
        })
        .collect();
    Ok(docs)
}

/// File names kustomize reads as a kustomization: its input, not objects.
pub const KUSTOMIZATION_FILES: [&str; 3] =
    ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Collects the manifest files under `path` into `out`, and into `foreign`
/// what a GitOps repository holds beside them that is not for agent-env:
/// kustomization files (built with `-k`, never read as objects) and Helm
/// chart directories (templates, not YAML).
fn collect_files(
    path: &Path,
    out: &mut Vec<PathBuf>,
    foreign: &mut Vec<(PathBuf, &'static str)>,
) -> Result<(), ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_dir() {
        if is_kustomization(path) {
            foreign.push((path.to_owned(), "kustomization file"));
        } else {
            out.push(path.to_owned());
        }
        return Ok(());
    }
    if path.join("Chart.yaml").is_file() {
        foreign.push((path.to_owned(), "Helm chart"));
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_err)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read_err)?;
    entries.sort();
    for e in entries {
        let hidden = e
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if e.is_dir() {
            collect_files(&e, out, foreign)?;
        } else if is_kustomization(&e) {
            foreign.push((e, "kustomization file"));
        } else if e
            .extension()
            .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        {
            out.push(e);
        }
    }
    Ok(())
}

/// The files the kustomization files among `foreign` name as patches
/// (`patches[].path`, `patchesStrategicMerge[]`, `patchesJson6902[].path`),
/// canonical. A kustomization that does not parse names none: it is
/// kustomize's to judge, not ours.
fn kustomize_patches(foreign: &[(PathBuf, &'static str)]) -> std::collections::HashSet<PathBuf> {
    let mut out = std::collections::HashSet::new();
    for (file, _) in foreign.iter().filter(|(f, _)| is_kustomization(f)) {
        let Some(dir) = file.parent() else { continue };
        let Ok(text) = read_manifest(file) else {
            continue;
        };
        let Ok(Some(k)) =
            yaml::documents(&text, yaml_budget(text.len())).map(|d| d.into_iter().next())
        else {
            continue;
        };
        let listed = |key: &str| k.get(key).and_then(Value::as_array).into_iter().flatten();
        let paths = listed("patchesStrategicMerge")
            .filter_map(Value::as_str)
            .chain(
                listed("patches")
                    .chain(listed("patchesJson6902"))
                    .filter_map(|p| p.get("path").and_then(Value::as_str)),
            );
        for p in paths {
            if let Ok(p) = std::fs::canonicalize(dir.join(p)) {
                out.insert(p);
            }
        }
    }
    out
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| KUSTOMIZATION_FILES.contains(&n))
}

/// Most documents one manifest file may hold (a generated fleet file can
/// hold thousands).
pub const MAX_DOCUMENTS_PER_FILE: usize = 100_000;
/// Largest manifest file read (32 MiB). Parsed YAML takes about twenty times
/// its text in memory, and a file is parsed whole before any of it is used.
pub const MAX_MANIFEST_FILE_BYTES: u64 = 32 * 1024 * 1024;
/// Most objects (non-empty documents, Secrets included) all manifest files
/// may hold together: room for 100,000 instances with a few instance-scope
/// objects each (the fleet bench's 100,000 instances are 400,000 objects),
/// a bound on what a repository can make the loader hold.
pub const MAX_OBJECTS: usize = 1_000_000;

/// How many parsed nodes (and scalar bytes) a manifest may hold per byte of
/// its text. Without aliases a document has fewer nodes than bytes; aliases
/// repeat what was written, which stays useful up to a small multiple. Past
/// that it is an alias bomb: a few hundred bytes of nested aliases expand to
/// millions of nodes and gigabytes of memory.
pub const MAX_EXPANSION: usize = 16;

fn yaml_budget(text_len: usize) -> yaml::Budget {
    let allowed = text_len.saturating_mul(MAX_EXPANSION).saturating_add(4096);
    yaml::Budget {
        documents: MAX_DOCUMENTS_PER_FILE,
        nodes: allowed.min(50_000_000),
        scalar_bytes: allowed.min(512 * 1024 * 1024),
    }
}

/// Builds a snapshot document by document.
pub struct Loader {
    snapshot: Snapshot,
    /// The documents taken, a file at a time (shared with the manifest
    /// cache): where an object defined twice was first defined, and the
    /// sources [`Loader::keep_sources`] keeps, are found here rather than
    /// each document's kind, key and source copied into a map of its own.
    taken: Vec<Arc<Vec<(Prepared, Source)>>>,
    /// Kinds taken under each key that is not in the snapshot's maps of
    /// valid objects: invalid objects and Secrets.
    others: HashMap<ObjectKey, Vec<String>>,
    objects: usize,
    max_objects: usize,
    fields: FieldValidation,
    keep_sources: bool,
}

impl Default for Loader {
    fn default() -> Self {
        Loader::with_max_objects(MAX_OBJECTS)
    }
}

impl Loader {
    /// A loader that takes at most `max` objects ([`MAX_OBJECTS`] by default).
    pub fn with_max_objects(max: usize) -> Self {
        Loader {
            snapshot: Snapshot::default(),
            taken: Vec::new(),
            others: HashMap::new(),
            objects: 0,
            max_objects: max,
            fields: FieldValidation::default(),
            keep_sources: false,
        }
    }

    /// Keeps where each object was read in [`Snapshot::sources`] (for
    /// explaining a result; a pass does not need it).
    pub fn keep_sources(mut self) -> Self {
        self.keep_sources = true;
        self
    }

    /// How fields no schema declares are treated ([`FieldValidation::Warn`] by default).
    pub fn with_field_validation(mut self, fields: FieldValidation) -> Self {
        self.fields = fields;
        self
    }

    /// Adds every document of one YAML file.
    pub fn add_file(&mut self, file: &Path, text: &str) -> Result<(), ManifestError> {
        let text = Text {
            name: file.to_owned(),
            text: text.to_owned(),
            lines: true,
        };
        let docs = self.parse_file(&text)?;
        self.insert_all(Arc::new(docs))
    }

    /// Checks every document of one YAML file, counting them against the
    /// object limit.
    fn parse_file(&mut self, t: &Text) -> Result<Vec<(Prepared, Source)>, ManifestError> {
        let docs = parse_yaml(t)?;
        self.check(&t.name, docs)
    }

    /// Checks the documents of one file, counting them against the object limit.
    fn check(
        &mut self,
        file: &Path,
        docs: Vec<(Value, Source)>,
    ) -> Result<Vec<(Prepared, Source)>, ManifestError> {
        let checked = check_docs(docs, self.fields);
        self.take_checked(file, checked)
    }

    /// Counts one file's checked documents against the object limit and
    /// gives the first refusal, in the order a serial load would meet them.
    fn take_checked(
        &mut self,
        file: &Path,
        checked: Vec<(Result<Prepared, ManifestError>, Source)>,
    ) -> Result<Vec<(Prepared, Source)>, ManifestError> {
        for _ in &checked {
            self.count(file)?;
        }
        let checked: Vec<(Prepared, Source)> = checked
            .into_iter()
            .map(|(p, source)| p.map(|p| (p, source)))
            .collect::<Result<_, _>>()?;
        // Logged when a file is checked, not when a cached check is reused:
        // the loop says it once per change of the file.
        for (p, source) in &checked {
            for field in &p.unknown_fields {
                tracing::warn!(
                    "{source}: {} {}: unknown field {field:?}, ignored (--strict refuses it)",
                    p.kind,
                    p.key
                );
            }
        }
        Ok(checked)
    }

    fn count(&mut self, file: &Path) -> Result<(), ManifestError> {
        self.objects += 1;
        if self.objects > self.max_objects {
            return Err(ManifestError::TooManyObjects {
                file: file.to_owned(),
                limit: self.max_objects,
            });
        }
        Ok(())
    }

    /// Adds one file's documents, checked again only when its text changed
    /// since `cache` saw it: a change to one file of a large fleet costs
    /// that file, not every file.
    fn add_file_cached(
        &mut self,
        file: PathBuf,
        hash: u64,
        docs: FileDocs,
        next: &mut ManifestCache,
    ) -> Result<(), ManifestError> {
        let docs = match docs {
            FileDocs::Checked(checked) => {
                for _ in checked.iter() {
                    self.count(&file)?;
                }
                checked
            }
            FileDocs::Parsed(checked) => {
                let docs = self.take_checked(&file, checked)?;
                // Said when a file is read anew, not when its check is
                // reused: the loop says it once per change of the file.
                for (p, _) in &docs {
                    if let Item::Invalid(inv) = &p.item {
                        tracing::error!("invalid {inv}");
                    }
                }
                Arc::new(docs)
            }
        };
        self.insert_all(Arc::clone(&docs))?;
        next.files.insert(file, CachedFile { hash, docs });
        Ok(())
    }

    /// Adds one parsed document.
    pub fn add_document(&mut self, doc: Value, source: Source) -> Result<(), ManifestError> {
        let prepared = prepare(doc, &source, self.fields)?;
        self.insert_all(Arc::new(vec![(prepared, source)]))
    }

    /// Adds one file's checked documents; an object defined before (in
    /// this file or an earlier one) is refused.
    fn insert_all(&mut self, docs: Arc<Vec<(Prepared, Source)>>) -> Result<(), ManifestError> {
        self.taken.push(Arc::clone(&docs));
        for (p, source) in docs.iter() {
            if let Item::Foreign = p.item {
                *self.snapshot.skipped.entry(p.kind.clone()).or_default() += 1;
                continue;
            }
            if self.is_taken(&p.kind, &p.key) {
                return Err(ManifestError::Duplicate {
                    kind: p.kind.clone(),
                    key: p.key.to_string(),
                    first: Box::new(self.first_source(&p.kind, &p.key).clone()),
                    second: Box::new(source.clone()),
                });
            }
            self.insert(p);
        }
        Ok(())
    }

    /// Whether an object of `kind` named `key` was added.
    fn is_taken(&self, kind: &str, key: &ObjectKey) -> bool {
        let s = &self.snapshot;
        let valid = match kind {
            "AgentInstance" => s.instances.contains_key(key),
            "PluginBinding" => s.bindings.contains_key(key),
            "PluginMarketplace" => s.marketplaces.contains_key(key),
            "McpServer" => s.mcp_servers.contains_key(key),
            _ => false,
        };
        valid
            || self
                .others
                .get(key)
                .is_some_and(|k| k.iter().any(|k| k == kind))
    }

    /// Where the object of `kind` named `key` was first defined.
    fn first_source(&self, kind: &str, key: &ObjectKey) -> &Source {
        self.documents()
            .find(|(p, _)| p.kind == kind && p.key == *key)
            .map(|(_, source)| source)
            .expect("a taken object was taken from a document")
    }

    /// Every document taken that is for agent-env, in order.
    fn documents(&self) -> impl Iterator<Item = &(Prepared, Source)> {
        (self.taken.iter().flat_map(|docs| docs.iter()))
            .filter(|(p, _)| !matches!(p.item, Item::Foreign))
    }

    /// Adds one checked document for agent-env (not defined before).
    fn insert(&mut self, p: &Prepared) {
        let key = p.key.clone();
        match &p.item {
            Item::Object(o) => match &**o {
                Object::Instance(o) => {
                    self.snapshot.instances.insert(key, Arc::clone(o));
                }
                Object::Binding(o) => {
                    self.snapshot.bindings.insert(key, Arc::clone(o));
                }
                Object::Marketplace(o) => {
                    self.snapshot.marketplaces.insert(key, Arc::clone(o));
                }
                Object::Mcp(o) => {
                    self.snapshot.mcp_servers.insert(key, Arc::clone(o));
                }
            },
            Item::Invalid(inv) => {
                self.snapshot.invalid.push((**inv).clone());
                self.others.entry(key).or_default().push(p.kind.clone());
            }
            Item::Secret(data) => {
                if let Some(data) = data {
                    (self.snapshot.secrets).insert(&key.namespace, &key.name, data.clone());
                }
                self.others.entry(key).or_default().push(p.kind.clone());
            }
            Item::Foreign => {}
        }
    }

    /// The snapshot.
    pub fn finish(mut self) -> Snapshot {
        if self.keep_sources {
            let sources = (self.documents())
                .map(|(p, source)| ((p.kind.clone(), p.key.clone()), source.clone()))
                .collect();
            self.snapshot.sources = sources;
        }
        self.snapshot
    }
}

/// A document checked on its own: what it is and what it adds.
#[derive(Clone)]
struct Prepared {
    kind: String,
    key: ObjectKey,
    item: Item,
    /// Paths of fields no schema declares, left out of `item`.
    unknown_fields: Vec<String>,
}

#[derive(Clone)]
enum Item {
    Object(Box<Object>),
    /// Boxed, as the object is: the manifest cache holds a document of
    /// each kind for every object of the fleet, most of them valid.
    Invalid(Box<InvalidObject>),
    /// A Secret's data; `None` when it lacks the label (it is ignored).
    Secret(Option<BTreeMap<String, SecretValue>>),
    /// A document for someone else (a Deployment, a Flux Kustomization):
    /// skipped and counted by kind.
    Foreign,
}

/// Checks one document by itself (schema, rules, Secret data); what spans
/// documents, duplicates, is the loader's.
/// Checks the documents of one file (schema, CEL, metadata). Documents
/// are independent: a file of many is spread over the cores, in order.
fn check_docs(
    docs: Vec<(Value, Source)>,
    fields: FieldValidation,
) -> Vec<(Result<Prepared, ManifestError>, Source)> {
    /// Fewer documents than this are checked on the calling thread.
    const CHUNK: usize = 64;
    if docs.len() <= CHUNK {
        return (docs.into_iter())
            .map(|(doc, source)| (prepare(doc, &source, fields), source))
            .collect();
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = docs.len().div_ceil(threads).max(CHUNK);
    let mut docs = docs;
    let mut checked: Vec<Result<Prepared, ManifestError>> = Vec::with_capacity(docs.len());
    std::thread::scope(|scope| {
        let workers: Vec<_> = docs
            .chunks_mut(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter_mut()
                        .map(|(doc, source)| prepare(std::mem::take(doc), source, fields))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for w in workers {
            checked.extend(w.join().expect("checking a document does not panic"));
        }
    });
    checked
        .into_iter()
        .zip(docs)
        .map(|(p, (_, source))| (p, source))
        .collect()
}

fn prepare(
    doc: Value,
    source: &Source,
    fields: FieldValidation,
) -> Result<Prepared, ManifestError> {
    let fail = |message: String| ManifestError::Document {
        source_doc: source.clone(),
        message,
    };
    let obj = doc.as_object();
    let text = |k: &str| {
        obj.and_then(|o| o.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    match classify(obj.is_some(), &api_version, &kind) {
        Class::Ours => {}
        Class::Foreign(what) if fields == FieldValidation::Warn => {
            return Ok(Prepared {
                kind: what,
                key: ObjectKey::new("", ""),
                item: Item::Foreign,
                unknown_fields: Vec::new(),
            });
        }
        Class::Foreign(what) => {
            return Err(fail(format!(
                "a {what}, not an agent-env object: refused under --strict (expected one of {KINDS})"
            )));
        }
        Class::Broken(message) => return Err(fail(message)),
    }
    let meta = obj
        .and_then(|o| o.get("metadata"))
        .and_then(Value::as_object);
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if name.is_empty() {
        return Err(fail(format!("{kind} has no metadata.name")));
    }
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_owned();
    // The API server refuses other names; here they would also steer the
    // default env dir `<namespace>/<name>` (`..`, `/`, `.agent-env`).
    if !crd::is_dns_subdomain(&name) {
        return Err(fail(format!(
            "field metadata.name: {name:?} is not a valid object name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)"
        )));
    }
    if !crd::is_dns_label(&namespace) {
        return Err(fail(format!(
            "field metadata.namespace: {namespace:?} is not a valid namespace (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"
        )));
    }
    let key = ObjectKey::new(&namespace, &name);
    let mut doc = doc;
    // Objects read from files carry the namespace they will be applied to.
    doc["metadata"]["namespace"] = Value::String(namespace.clone());
    let unknown = unknown_fields(&kind, &doc);
    // What the server would refuse besides the schema: strictness, when
    // asked for, and the ObjectMeta rules.
    let mut refusals: Vec<String> = Vec::new();
    if fields == FieldValidation::Strict {
        refusals.extend(unknown.iter().map(|f| format!("unknown field {f:?}")));
    }
    if let Err(e) = check_metadata(&doc["metadata"]) {
        refusals.push(e);
    }
    let item = if kind == "Secret" {
        if !refusals.is_empty() {
            return Err(fail(format!("Secret {key}: {}", refusals.join("; "))));
        }
        Item::Secret(secret_data(&doc, &key, source)?)
    } else {
        match validate(&kind, &doc, &source.to_string()) {
            Ok(o) if refusals.is_empty() => Item::Object(Box::new(o)),
            Ok(_) => Item::Invalid(Box::new(InvalidObject {
                kind: kind.clone(),
                key: key.clone(),
                source: source.to_string(),
                message: refusals.join("; "),
                scope: scope_hint(&kind, &doc),
            })),
            Err(mut inv) => {
                refusals.push(inv.message);
                inv.message = refusals.join("; ");
                Item::Invalid(Box::new(inv))
            }
        }
    };
    Ok(Prepared {
        kind,
        key,
        item,
        unknown_fields: if fields == FieldValidation::Warn {
            unknown
        } else {
            Vec::new()
        },
    })
}

/// What a document is to agent-env.
enum Class {
    /// One of the four agent kinds, or a core Secret.
    Ours,
    /// Anything else a GitOps repository holds (a Deployment, a Flux
    /// Kustomization, a Helm values file): what it is, for the summary.
    Foreign(String),
    /// Meant for agent-env but not a kind it serves (a typo, another
    /// version), or half an object: an error, never skipped.
    Broken(String),
}

fn classify(mapping: bool, api_version: &str, kind: &str) -> Class {
    const AGENT_KINDS: [&str; 4] = [
        "AgentInstance",
        "PluginBinding",
        "PluginMarketplace",
        "McpServer",
    ];
    let ours = api_version == format!("{}/{}", crd::GROUP, crd::VERSION);
    let our_group = api_version
        .split_once('/')
        .is_some_and(|(group, _)| group == crd::GROUP);
    let agent_kind = AGENT_KINDS.contains(&kind);
    match (api_version, kind) {
        _ if !mapping => Class::Foreign("document that is not a mapping".into()),
        _ if ours && agent_kind => Class::Ours,
        ("v1", "Secret") => Class::Ours,
        _ if our_group || agent_kind => Class::Broken(format!(
            "unknown kind {kind:?} (apiVersion {api_version:?}); expected one of {KINDS}"
        )),
        ("", "") => Class::Foreign("document without apiVersion and kind".into()),
        ("", _) => Class::Broken(format!("{kind} has no apiVersion")),
        (_, "") => Class::Broken(format!(
            "document of apiVersion {api_version:?} has no kind"
        )),
        (_, kind) => Class::Foreign(kind.to_owned()),
    }
}

/// The 1-based line each YAML document of `text` starts on, by document
/// index as the parser counts them: every `---` marker starts one (an empty
/// document between two markers counts), and so does content when no
/// document is open. A document starts at its marker, or else at its first
/// line of content.
fn document_lines(text: &str) -> Vec<usize> {
    fn marker(line: &str, m: &str) -> bool {
        line.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
    }
    let mut starts = Vec::new();
    // Whether a document is open: content goes on in it.
    let mut open = false;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if marker(line, "---") {
            starts.push(n);
            open = true;
        } else if marker(line, "...") {
            open = false;
        } else if !open && !line.starts_with('%') && {
            let rest = line.trim_start();
            !rest.is_empty() && !rest.starts_with('#')
        } {
            starts.push(n);
            open = true;
        }
    }
    starts
}

fn secret_data(
    doc: &Value,
    key: &ObjectKey,
    source: &Source,
) -> Result<Option<BTreeMap<String, SecretValue>>, ManifestError> {
    let labelled = doc["metadata"]["labels"][crd::SECRETS_LABEL].as_str() == Some("true");
    if !labelled {
        return Ok(None);
    }
    let fail = |message: String| ManifestError::Document {
        source_doc: source.clone(),
        message: format!("Secret {key}: {message}"),
    };
    let mut data = BTreeMap::new();
    if let Some(d) = doc.get("data").filter(|d| !d.is_null()) {
        let d = d
            .as_object()
            .ok_or_else(|| fail("data must be a mapping".into()))?;
        for (k, v) in d {
            let bytes = v
                .as_str()
                .and_then(|s| {
                    base64::engine::general_purpose::STANDARD
                        .decode(s.trim())
                        .ok()
                })
                .ok_or_else(|| fail(format!("data.{k} is not valid base64")))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| fail(format!("data.{k} is not UTF-8 text")))?;
            data.insert(k.clone(), SecretValue::new(text));
        }
    }
    if let Some(d) = doc.get("stringData").filter(|d| !d.is_null()) {
        let d = d
            .as_object()
            .ok_or_else(|| fail("stringData must be a mapping".into()))?;
        for (k, v) in d {
            let text = v
                .as_str()
                .ok_or_else(|| fail(format!("stringData.{k} must be a string")))?;
            // As on the API server, stringData wins over data for one key.
            data.insert(k.clone(), SecretValue::new(text.to_owned()));
        }
    }
    Ok(Some(data))
}

/// One of the four custom resources, validated.
#[derive(Clone, Debug)]
/// Shared, not copied: a checked object sits in the manifest cache (or a
/// controller's catalog) and in every snapshot made from it.
pub enum Object {
    /// An AgentInstance.
    Instance(Arc<AgentInstance>),
    /// A PluginBinding.
    Binding(Arc<PluginBinding>),
    /// A PluginMarketplace.
    Marketplace(Arc<PluginMarketplace>),
    /// An McpServer.
    Mcp(Arc<McpServer>),
}

/// Checks one object of `kind` against its schema, CEL rules and the rules
/// CEL cannot say, as the API server would and more: the same check for
/// objects read from files and from a cluster. `source` says where it came
/// from in messages. The namespace must be set in `doc`.
#[allow(clippy::result_large_err)] // built once per object change; boxing buys nothing
pub fn validate(kind: &str, doc: &Value, source: &str) -> Result<Object, InvalidObject> {
    // The API server prunes a null of a non-nullable field and keeps a null
    // of a nullable one without running its CEL rules; either way the field
    // is as good as absent, which is how it is checked here.
    let pruned;
    let doc = if has_null_field(doc) {
        let mut copy = doc.clone();
        drop_null_fields(&mut copy);
        pruned = copy;
        &pruned
    } else {
        doc
    };
    let result = match kind {
        "AgentInstance" => schema::typed::<AgentInstance>(doc, "AgentInstance")
            .and_then(|o| check_instance(&o, doc).map(|()| Object::Instance(Arc::new(o)))),
        "PluginBinding" => schema::typed::<PluginBinding>(doc, "PluginBinding").and_then(|o| {
            check_target(&o.spec.target)?;
            check_binding(&o)?;
            Ok(Object::Binding(Arc::new(o)))
        }),
        "PluginMarketplace" => schema::typed::<PluginMarketplace>(doc, "PluginMarketplace")
            .and_then(|o| {
                check_target(&o.spec.target)?;
                check_source(&o.spec.source)?;
                Ok(Object::Marketplace(Arc::new(o)))
            }),
        "McpServer" => schema::typed::<McpServer>(doc, "McpServer").and_then(|o| {
            check_target(&o.spec.target)?;
            check_mcp(&o)?;
            Ok(Object::Mcp(Arc::new(o)))
        }),
        other => Err(format!("unknown kind {other:?}; expected one of {KINDS}")),
    };
    result.map_err(|message| {
        let meta = &doc["metadata"];
        InvalidObject {
            kind: kind.to_owned(),
            key: ObjectKey::new(
                meta["namespace"].as_str().unwrap_or_default(),
                meta["name"].as_str().unwrap_or_default(),
            ),
            source: source.to_owned(),
            message,
            scope: scope_hint(kind, doc),
        }
    })
}

fn has_null_field(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.values().any(|x| x.is_null() || has_null_field(x)),
        Value::Array(items) => items.iter().any(has_null_field),
        _ => false,
    }
}

/// Removes every object field whose value is null. A null list item stays:
/// the server refuses it, and so does the typed check.
fn drop_null_fields(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_null_fields);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null_fields),
        _ => {}
    }
}

/// The ObjectMeta rules the API server applies to labels and annotations of
/// every object, so a manifest `kubectl apply` would refuse is refused here.
fn check_metadata(meta: &Value) -> Result<(), String> {
    let mut errors = Vec::new();
    for (field, values) in [("labels", true), ("annotations", false)] {
        let Some(map) = meta.get(field).filter(|m| !m.is_null()) else {
            continue;
        };
        let Some(map) = map.as_object() else {
            errors.push(format!("field metadata.{field}: must be a map of strings"));
            continue;
        };
        let mut size = 0;
        for (k, v) in map {
            if let Err(why) = qualified_name(k) {
                errors.push(format!("field metadata.{field}: {k:?}: {why}"));
            }
            let Some(v) = v.as_str() else {
                errors.push(format!("field metadata.{field}.{k}: must be a string"));
                continue;
            };
            size += k.len() + v.len();
            if values && let Err(why) = label_value(v) {
                errors.push(format!("field metadata.{field}.{k}: {v:?}: {why}"));
            }
        }
        if !values && size > MAX_ANNOTATIONS_BYTES {
            errors.push(format!(
                "field metadata.{field}: {size} bytes in all, over the limit of {MAX_ANNOTATIONS_BYTES}"
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The API server's limit on all annotations of an object together.
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 bytes: the name
/// part of a label or annotation key, and a non-empty label value.
fn name_part(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(inner)
}

/// A label or annotation key: an optional DNS subdomain prefix and `/`, then a name part.
fn qualified_name(k: &str) -> Result<(), &'static str> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if prefix.is_some_and(|p| p.is_empty() || !crd::is_dns_subdomain(p)) {
        return Err(
            "the prefix before / must be a DNS subdomain (lowercase letters, digits, '-' and '.')",
        );
    }
    if !name_part(name) {
        return Err(
            "a key's name must be at most 63 characters: letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        );
    }
    Ok(())
}

fn label_value(v: &str) -> Result<(), &'static str> {
    if v.is_empty() || name_part(v) {
        Ok(())
    } else {
        Err(
            "a label value must be empty or at most 63 characters: letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        )
    }
}

/// The scope an invalid object would have applied at, as far as it can be read.
fn scope_hint(kind: &str, doc: &Value) -> Vec<Scope> {
    if kind == "AgentInstance" {
        return doc["metadata"]["name"]
            .as_str()
            .map(|n| vec![Scope::Instance(n.to_owned())])
            .unwrap_or_default();
    }
    let t = &doc["spec"]["target"];
    let mut out = Vec::new();
    if let Some(a) = t["agentType"].as_str() {
        out.push(Scope::Type(a.to_owned()));
    }
    if let Some(i) = t["instance"].as_str() {
        out.push(Scope::Instance(i.to_owned()));
    }
    out
}

/// A one-of field set to `null` passes CEL's `has()` but sets nothing, so the
/// one-of rules are checked again on the typed object.
fn check_target(t: &crate::crd::Target) -> Result<(), String> {
    match t.scope() {
        Some(_) => Ok(()),
        None => Err("field spec.target: set exactly one of agentType or instance".into()),
    }
}

fn check_source(s: &crate::crd::MarketplaceSource) -> Result<(), String> {
    let set = [
        s.github.is_some(),
        s.git.is_some(),
        s.url.is_some(),
        s.directory.is_some(),
        s.file.is_some(),
    ];
    if set.iter().filter(|x| **x).count() == 1 {
        Ok(())
    } else {
        Err("field spec.source: set exactly one of github, git, url, directory or file".into())
    }
}

/// `x-kubernetes-list-type: map` makes the API server refuse a plugin listed
/// twice; CEL cannot say it, so it is checked here.
fn check_binding(o: &PluginBinding) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in o.spec.plugins.iter().enumerate() {
        if !seen.insert(&p.name) {
            return Err(format!(
                "field spec.plugins[{i}].name: {:?} is listed twice",
                p.name
            ));
        }
    }
    Ok(())
}

/// A namespace owns `<namespace>/` of the env root: the default env dir is
/// `<namespace>/<name>`, and a cluster can hand each namespace that directory
/// as its own volume. A path elsewhere would let one namespace's objects and
/// secrets be written where another namespace's agents read, or hold back
/// another namespace's instance by claiming its dir. CEL cannot say this: a
/// CRD rule does not see `metadata.namespace`.
fn check_instance(o: &AgentInstance, doc: &Value) -> Result<(), String> {
    let Some(path) = o.spec.env_dir.as_ref().and_then(|e| e.path.as_deref()) else {
        return Ok(());
    };
    let namespace = doc["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    if segments.next() == Some(namespace) && segments.next().is_some() {
        return Ok(());
    }
    Err(format!(
        "field spec.envDir.path: must lie under {namespace}/, the part of the env root that belongs to the instance's namespace"
    ))
}

fn check_mcp(o: &McpServer) -> Result<(), String> {
    let kinds = [
        o.spec.stdio.is_some(),
        o.spec.http.is_some(),
        o.spec.sse.is_some(),
    ];
    if kinds.iter().filter(|x| **x).count() != 1 {
        return Err("field spec: set exactly one of stdio, http or sse".into());
    }
    let entry = shape::mcp_entry(&o.spec);
    secrets::check_entry_placeholders(&entry).map_err(|(field, e)| {
        let kind = if o.spec.stdio.is_some() {
            "stdio"
        } else if o.spec.http.is_some() {
            "http"
        } else {
            "sse"
        };
        format!("field spec.{kind}.{field}: {e}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Files are parsed several at a time; what a load says is still what
    /// reading them one by one, in name order, would say first.
    #[test]
    fn the_first_bad_file_in_name_order_is_the_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {name: a, namespace: ns}\nspec: {agentType: t}\n";
        for (name, text) in [
            ("1.yaml", good),
            ("2.yaml", "a: [unclosed\n"),
            ("3.yaml", "b: {unclosed\n"),
            ("4.yaml", good),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let paths = vec![dir.path().to_owned()];
        for load in [
            load_paths(&paths, FieldValidation::Warn),
            load_cached(
                &Inputs::files(&paths, FieldValidation::Warn),
                &mut ManifestCache::default(),
            ),
        ] {
            match load {
                Err(ManifestError::Yaml { file, .. }) => {
                    assert!(file.ends_with("2.yaml"), "{file:?}")
                }
                other => panic!("expected 2.yaml's YAML error, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_cached_load_equals_a_fresh_one_after_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        let inst = |name: &str, ty: &str| {
            format!(
                "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{agentType: {ty}}}\n"
            )
        };
        let paths = vec![dir.path().to_owned()];
        let mut cache = ManifestCache::default();
        let same = |cache: &mut ManifestCache| {
            let cached = load_cached(&Inputs::files(&paths, FieldValidation::Warn), cache)
                .map(|s| format!("{s:?}"));
            let fresh = load_paths(&paths, FieldValidation::Warn).map(|s| format!("{s:?}"));
            match (cached, fresh) {
                (Ok(c), Ok(f)) => assert_eq!(c, f),
                (Err(c), Err(f)) => assert_eq!(c.to_string(), f.to_string()),
                (c, f) => panic!("cached {c:?} but fresh {f:?}"),
            }
        };
        std::fs::write(&a, inst("xa", "t1")).unwrap();
        std::fs::write(&b, inst("ya", "t1")).unwrap();
        same(&mut cache);
        std::fs::write(&b, inst("ya", "t2")).unwrap();
        same(&mut cache);
        // A duplicate across an unchanged file and a changed one is still found.
        std::fs::write(&b, inst("xa", "t2")).unwrap();
        same(&mut cache);
        assert!(load_cached(&Inputs::files(&paths, FieldValidation::Warn), &mut cache).is_err());
        std::fs::write(&b, inst("ya", "no spaces allowed here")).unwrap();
        same(&mut cache);
        std::fs::remove_file(&a).unwrap();
        std::fs::write(&b, inst("ya", "t3")).unwrap();
        same(&mut cache);
        let s = load_cached(&Inputs::files(&paths, FieldValidation::Warn), &mut cache).unwrap();
        assert_eq!(s.instances.len(), 1);
        assert_eq!(s.instances.values().next().unwrap().spec.agent_type, "t3");
    }

    /// A reload's digests come from the unchanged objects' kept digests and
    /// equal those of a fresh load; they change for exactly the instances
    /// whose inputs changed.
    #[test]
    fn memoized_input_digests_equal_fresh_ones_and_follow_changes() {
        use crate::engine::snapshot::DigestMemo;
        let dir = tempfile::tempdir().unwrap();
        let binding = |ty: &str, plugins: &[&str]| {
            format!(
                "apiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata: {{name: {ty}-plugins, namespace: ns}}\nspec:\n  target: {{agentType: {ty}}}\n  plugins: [{}]\n",
                plugins
                    .iter()
                    .map(|p| format!("{{name: {p}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let instances = |b_type: &str| {
            format!(
                "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {{name: a, namespace: ns}}\nspec: {{agentType: t1}}\n---\napiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {{name: b, namespace: ns}}\nspec: {{agentType: {b_type}}}\n"
            )
        };
        let types = |t1: &[&str]| format!("{}---\n{}", binding("t1", t1), binding("t2", &["q@m"]));
        std::fs::write(dir.path().join("types.yaml"), types(&["p@m"])).unwrap();
        std::fs::write(dir.path().join("instances.yaml"), instances("t2")).unwrap();
        let paths = vec![dir.path().to_owned()];
        let (mut cache, mut memo) = (ManifestCache::default(), DigestMemo::default());
        let mut reload = || {
            let cached = load_cached(&Inputs::files(&paths, FieldValidation::Warn), &mut cache)
                .unwrap()
                .input_digests(&mut memo);
            let fresh = load_paths(&paths, FieldValidation::Warn)
                .unwrap()
                .input_digests(&mut DigestMemo::default());
            assert_eq!(cached, fresh);
            cached
        };
        let key = |n: &str| ObjectKey::new("ns", n);
        let first = reload();
        assert_eq!(reload(), first, "nothing changed");

        // t1's binding changes (same name): a's digest changes, b's does not.
        std::fs::write(dir.path().join("types.yaml"), types(&["p@m", "r@m"])).unwrap();
        let second = reload();
        assert_ne!(second[&key("a")], first[&key("a")]);
        assert_eq!(second[&key("b")], first[&key("b")]);

        // b moves to t1: its digest changes, a's does not.
        std::fs::write(dir.path().join("instances.yaml"), instances("t1")).unwrap();
        let third = reload();
        assert_eq!(third[&key("a")], second[&key("a")]);
        assert_ne!(third[&key("b")], second[&key("b")]);
    }

    #[test]
    fn a_file_may_hold_thousands_of_documents() {
        let doc = |i: usize| {
            format!(
                "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {{name: a{i}, namespace: fleet}}\nspec: {{agentType: t}}\n"
            )
        };
        let text: Vec<String> = (0..5000).map(doc).collect();
        let mut loader = Loader::default();
        loader
            .add_file(Path::new("fleet.yaml"), &text.join("---\n"))
            .unwrap();
        assert_eq!(loader.finish().instances.len(), 5000);
    }

    fn invalid_message(spec: &str, kind: &str) -> String {
        let text = format!(
            "apiVersion: agentenv.io/v1alpha1\nkind: {kind}\nmetadata: {{name: o, namespace: dev}}\nspec: {spec}\n"
        );
        let mut loader = Loader::default();
        loader.add_file(Path::new("x.yaml"), &text).unwrap();
        let snap = loader.finish();
        assert_eq!(snap.invalid.len(), 1, "{spec} was accepted");
        snap.invalid[0].message.clone()
    }

    #[test]
    fn unknown_fields_are_named_by_path_and_refused_only_when_strict() {
        let doc = json!({
            "apiVersion": "agentenv.io/v1alpha1", "kind": "McpServer", "colour": 1,
            "metadata": {"name": "m", "namespace": "dev", "labels": {"a": "b"}, "colour": 1},
            "spec": {"target": {"agentType": "t"}, "stdio": {"command": "x", "cwd": "/",
                     "env": {"ANY": "name"}}, "nmae": "m"},
        });
        assert_eq!(
            unknown_fields("McpServer", &doc),
            ["metadata.colour", "colour", "spec.stdio.cwd", "spec.nmae"]
        );
        let source = Source {
            file: Path::new("x.yaml").into(),
            document: 1,
            line: 0,
        };
        let mut warn = Loader::default();
        warn.add_document(doc.clone(), source.clone()).unwrap();
        assert_eq!(warn.finish().mcp_servers.len(), 1);
        let mut strict = Loader::default().with_field_validation(FieldValidation::Strict);
        strict.add_document(doc, source).unwrap();
        let snap = strict.finish();
        assert!(snap.mcp_servers.is_empty());
        assert!(
            snap.invalid[0]
                .message
                .starts_with("unknown field \"metadata.colour\"; unknown field \"colour\""),
            "{}",
            snap.invalid[0].message
        );
    }

    #[test]
    fn labels_and_annotations_follow_the_api_servers_rules() {
        let with = |meta: Value| {
            let mut doc = json!({
                "apiVersion": "agentenv.io/v1alpha1", "kind": "AgentInstance",
                "metadata": {"name": "a", "namespace": "dev"}, "spec": {"agentType": "t"},
            });
            doc["metadata"]
                .as_object_mut()
                .unwrap()
                .extend(meta.as_object().unwrap().clone());
            let mut loader = Loader::default();
            loader
                .add_document(
                    doc,
                    Source {
                        file: Path::new("x.yaml").into(),
                        document: 1,
                        line: 0,
                    },
                )
                .unwrap();
            loader.finish().invalid.first().map(|i| i.message.clone())
        };
        assert_eq!(
            with(json!({"labels": {"agentenv.io/x": "", "a.b_c-d": "V.1"}})),
            None
        );
        assert_eq!(
            with(json!({"annotations": {"example.com/note": "any text at all"}})),
            None
        );
        for (meta, says) in [
            (
                json!({"labels": {"a b": "x"}}),
                "field metadata.labels: \"a b\"",
            ),
            (
                json!({"labels": {"a": "x/y"}}),
                "field metadata.labels.a: \"x/y\"",
            ),
            (
                json!({"labels": {"a": "v".repeat(64)}}),
                "field metadata.labels.a",
            ),
            (
                json!({"labels": {"Bad_Prefix/a": "x"}}),
                "the prefix before /",
            ),
            (
                json!({"labels": {"a": 1}}),
                "field metadata.labels.a: must be a string",
            ),
            (
                json!({"annotations": {"-a": "x"}}),
                "field metadata.annotations: \"-a\"",
            ),
            (
                json!({"annotations": {"a": "x".repeat(MAX_ANNOTATIONS_BYTES)}}),
                "bytes in all",
            ),
        ] {
            let got = with(meta.clone()).unwrap_or_else(|| panic!("{meta} was accepted"));
            assert!(got.contains(says), "{meta}: {got}");
        }
    }

    #[test]
    fn a_null_field_is_as_good_as_absent() {
        let mut loader = Loader::default();
        let doc = json!({
            "apiVersion": "agentenv.io/v1alpha1", "kind": "McpServer",
            "metadata": {"name": "m", "namespace": "dev"},
            "spec": {"target": {"agentType": "t", "instance": null}, "name": null, "enabled": null,
                     "http": {"url": "https://x", "headers": {"A": null}}},
        });
        loader
            .add_document(
                doc,
                Source {
                    file: Path::new("x.yaml").into(),
                    document: 1,
                    line: 0,
                },
            )
            .unwrap();
        let snap = loader.finish();
        assert!(snap.invalid.is_empty(), "{:?}", snap.invalid);
        let m = snap.mcp_servers.values().next().unwrap();
        assert!(m.spec.enabled);
        assert!(m.spec.http.as_ref().unwrap().headers.is_empty());
    }

    #[test]
    fn a_one_of_set_to_null_or_a_too_short_value_is_invalid() {
        let cases = [
            (
                "PluginMarketplace",
                "{target: {agentType: t}, source: {directory: null}}",
                "field spec.source: set exactly one of",
            ),
            (
                "McpServer",
                "{target: {agentType: t}, stdio: null}",
                "field spec: set exactly one of stdio, http or sse",
            ),
            (
                "PluginBinding",
                "{target: {agentType: null}, plugins: []}",
                "field spec.target: set exactly one of agentType or instance",
            ),
            (
                "PluginBinding",
                "{target: {agentType: ''}, plugins: []}",
                "field spec.target.agentType: must be at least 1 characters",
            ),
            (
                "McpServer",
                "{target: {instance: i}, http: {url: 'https://x'}, timeout: 0}",
                "field spec.timeout: must be at least 1",
            ),
            (
                "AgentInstance",
                "{agentType: ''}",
                "field spec.agentType: must be at least 1 characters",
            ),
        ];
        for (kind, spec, want) in cases {
            let got = invalid_message(spec, kind);
            assert!(got.starts_with(want), "{kind} {spec}: {got}");
        }
    }

    #[test]
    fn the_crds_bounds_are_enforced_as_on_the_api_server() {
        let plugins: Vec<String> = (0..=crd::MAX_PLUGINS_PER_BINDING)
            .map(|i| format!("{{name: p{i}@m}}"))
            .collect();
        let headers: Vec<String> = (0..=crd::MAX_HEADERS).map(|i| format!("h{i}: v")).collect();
        let cases = [
            (
                "AgentInstance",
                "{agentType: t, envDir: {uid: 4294967296}}".to_owned(),
                "field spec.envDir.uid: invalid value: integer `4294967296`",
            ),
            (
                "AgentInstance",
                format!("{{agentType: {}}}", "t".repeat(254)),
                "field spec.agentType: must be at most 253 characters, not 254",
            ),
            (
                "PluginBinding",
                format!(
                    "{{target: {{agentType: t}}, plugins: [{}]}}",
                    plugins.join(", ")
                ),
                "field spec.plugins: must have at most 1024 items, not 1025",
            ),
            (
                "McpServer",
                format!(
                    "{{target: {{agentType: t}}, http: {{url: 'https://x', headers: {{{}}}}}}}",
                    headers.join(", ")
                ),
                "field spec.http.headers: must have at most 64 entries, not 65",
            ),
            (
                "McpServer",
                "{target: {instance: i}, http: {url: 'https://x'}, timeout: 86400001}".to_owned(),
                "field spec.timeout: must be at most 86400000",
            ),
        ];
        for (kind, spec, want) in cases {
            let got = invalid_message(&spec, kind);
            assert!(got.starts_with(want), "{kind}: {got}");
        }
        // The bounds themselves are fine.
        let at_limit = format!(
            "{{agentType: {}, envDir: {{uid: 4294967295}}}}",
            "t".repeat(253)
        );
        let text = format!(
            "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {{name: o, namespace: dev}}\nspec: {at_limit}\n"
        );
        let mut loader = Loader::default();
        loader.add_file(Path::new("x.yaml"), &text).unwrap();
        assert_eq!(loader.finish().instances.len(), 1);
    }

    #[test]
    fn nested_aliases_cannot_expand_far_beyond_the_text() {
        let mut text = String::from(
            "apiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata: {name: b}\nspec:\n  target: {agentType: t}\n  plugins: []\n  x0: &x0 [a, a, a, a, a, a, a, a, a, a]\n",
        );
        for i in 1..6 {
            let refs = vec![format!("*x{}", i - 1); 10].join(", ");
            text.push_str(&format!("  x{i}: &x{i} [{refs}]\n"));
        }
        text.push_str(&format!("  y: [{}]\n", ["*x5"; 9].join(", ")));
        // About 10^6 nodes from under 1 KiB.
        assert!(text.len() < 1024);
        let e = Loader::default()
            .add_file(Path::new("bomb.yaml"), &text)
            .unwrap_err();
        assert!(matches!(e, ManifestError::Yaml { .. }), "{e}");
        // A few aliases of a small anchor stay fine.
        let shared = "apiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata: {name: b, labels: &l {team: x}, annotations: *l}\nspec:\n  target: {agentType: t}\n  plugins: [{name: a@m}]\n";
        let mut loader = Loader::default();
        loader.add_file(Path::new("ok.yaml"), shared).unwrap();
        assert_eq!(loader.finish().bindings.len(), 1);
    }

    #[test]
    fn names_that_could_steer_an_env_dir_are_refused() {
        for (meta, field) in [
            ("{name: '..'}", "metadata.name"),
            ("{name: a/b}", "metadata.name"),
            ("{name: Alice}", "metadata.name"),
            ("{name: \"\\ufffdalice\"}", "metadata.name"),
            ("{name: a, namespace: ..}", "metadata.namespace"),
            ("{name: a, namespace: .agent-env}", "metadata.namespace"),
            ("{name: a, namespace: a.b}", "metadata.namespace"),
        ] {
            let text = format!(
                "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {meta}\nspec: {{agentType: t}}\n"
            );
            let e = Loader::default()
                .add_file(Path::new("x.yaml"), &text)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("x.yaml:1 (document 1): field {field}: ")),
                "{meta}: {e}"
            );
        }
        let ok = "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {name: agent-1.team, namespace: team-a}\nspec: {agentType: t}\n";
        Loader::default().add_file(Path::new("x.yaml"), ok).unwrap();
    }

    #[test]
    fn document_and_object_limits_name_the_file_and_the_limit() {
        let mut loader = Loader::default();
        let err = loader
            .add_file(
                Path::new("storm.yaml"),
                &"---\n".repeat(MAX_DOCUMENTS_PER_FILE + 1),
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "storm.yaml: more than 100000 YAML documents, the limit per manifest file"
        );

        let doc = |i: usize| {
            format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: s{i}, namespace: ns}}\n")
        };
        let text = |range: std::ops::Range<usize>| range.map(doc).collect::<Vec<_>>().join("---\n");
        let mut loader = Loader::with_max_objects(10);
        loader.add_file(Path::new("a.yaml"), &text(0..6)).unwrap();
        // Empty documents are not objects.
        loader.add_file(Path::new("b.yaml"), "---\n---\n").unwrap();
        loader.add_file(Path::new("c.yaml"), &text(6..10)).unwrap();
        let err = loader.add_file(Path::new("d.yaml"), &doc(10)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "d.yaml: the manifests hold more than 10 objects, the limit for all manifest files together"
        );
    }

    #[test]
    fn empty_documents_are_skipped_and_namespace_defaults() {
        let mut loader = Loader::default();
        loader
            .add_file(
                Path::new("x.yaml"),
                "---\n---\napiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {name: a}\nspec: {agentType: t}\n---\n",
            )
            .unwrap();
        let snap = loader.finish();
        assert!(
            snap.instances
                .contains_key(&ObjectKey::new(DEFAULT_NAMESPACE, "a"))
        );
    }

    /// The line each object's source names is where its document starts,
    /// counted as the parser counts documents, whatever the layout.
    #[test]
    fn sources_name_the_line_each_document_starts_on() {
        let inst = |name: &str| {
            format!(
                "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {{name: {name}}}\nspec: {{agentType: t}}\n"
            )
        };
        // Each layout, and each object's name, document and line in it.
        type Layout<'a> = (String, Vec<(&'a str, usize, usize)>);
        let layouts: Vec<Layout> = vec![
            (inst("a"), vec![("a", 1, 1)]),
            (format!("# head\n\n{}", inst("a")), vec![("a", 1, 3)]),
            (
                format!("---\n{}---\n{}", inst("a"), inst("b")),
                vec![("a", 1, 1), ("b", 2, 6)],
            ),
            // An empty document between two markers counts.
            (
                format!("{}---\n---\n\n{}", inst("a"), inst("b")),
                vec![("a", 1, 1), ("b", 3, 6)],
            ),
            (
                format!(
                    "%YAML 1.2\n---\n{}...\n# between\n---\n{}",
                    inst("a"),
                    inst("b")
                ),
                vec![("a", 1, 2), ("b", 2, 9)],
            ),
            (
                format!(
                    "--- # first\n{}--- {{apiVersion: agentenv.io/v1alpha1, kind: AgentInstance, metadata: {{name: b}}, spec: {{agentType: t}}}}\n",
                    inst("a")
                ),
                vec![("a", 1, 1), ("b", 2, 6)],
            ),
            // A block scalar's indented `---` is content, not a marker.
            (
                format!(
                    "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata:\n  name: a\n  annotations:\n    note: |\n      ---\n      text\nspec: {{agentType: t}}\n---\n{}",
                    inst("b")
                ),
                vec![("a", 1, 1), ("b", 2, 10)],
            ),
        ];
        for (text, want) in layouts {
            let mut loader = Loader::default().keep_sources();
            loader.add_file(Path::new("x.yaml"), &text).unwrap();
            let snap = loader.finish();
            for (name, document, line) in want {
                let source = &snap.sources[&(
                    "AgentInstance".to_owned(),
                    ObjectKey::new(DEFAULT_NAMESPACE, name),
                )];
                assert_eq!(
                    (source.document, source.line),
                    (document, line),
                    "{name} in:\n{text}"
                );
                assert_eq!(
                    source.to_string(),
                    format!("x.yaml:{line} (document {document})")
                );
            }
        }
    }

    /// An object defined twice is refused naming both documents, whether
    /// either is valid, in one file or two; names only clash within a kind.
    #[test]
    fn an_object_defined_twice_names_both_documents() {
        let doc = |kind: &str, name: &str, spec: &str| match kind {
            "Secret" => format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: dev}}\n"
            ),
            _ => format!(
                "apiVersion: agentenv.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: dev}}\nspec: {spec}\n"
            ),
        };
        let valid = doc("AgentInstance", "a", "{agentType: t}");
        let invalid = doc(
            "AgentInstance",
            "a",
            "{agentType: t, runtimeInstalls: sometimes}",
        );
        let foreign =
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a, namespace: dev}\n";
        let binding = doc(
            "PluginBinding",
            "a",
            "{target: {agentType: t}, plugins: [{name: p@m}]}",
        );
        let secret = doc("Secret", "a", "");
        // Files in order; where the clash is: (file, document) first and second.
        type Case<'a> = (Vec<Vec<&'a str>>, &'a str, (usize, usize), (usize, usize));
        let cases: Vec<Case> = vec![
            (
                vec![vec![&valid, foreign, &valid]],
                "AgentInstance",
                (0, 1),
                (0, 3),
            ),
            (
                vec![vec![&invalid], vec![&binding, &valid]],
                "AgentInstance",
                (0, 1),
                (1, 2),
            ),
            (
                vec![vec![&valid], vec![&invalid]],
                "AgentInstance",
                (0, 1),
                (1, 1),
            ),
            (
                vec![vec![&secret, &valid], vec![&secret]],
                "Secret",
                (0, 1),
                (1, 1),
            ),
        ];
        for (files, kind, first, second) in cases {
            let mut loader = Loader::default();
            let err = files
                .iter()
                .enumerate()
                .find_map(|(i, docs)| {
                    loader
                        .add_file(Path::new(&format!("f{i}.yaml")), &docs.join("---\n"))
                        .err()
                })
                .expect("the second definition is refused");
            let ManifestError::Duplicate {
                kind: k,
                key,
                first: a,
                second: b,
            } = err
            else {
                panic!("not a duplicate: {err}");
            };
            assert_eq!((k.as_str(), key.as_str()), (kind, "dev/a"));
            let at = |s: &Source| (s.file.display().to_string(), s.document);
            assert_eq!(at(&a), (format!("f{}.yaml", first.0), first.1));
            assert_eq!(at(&b), (format!("f{}.yaml", second.0), second.1));
        }
        // One name in four kinds (one of them invalid) and a foreign kind: no clash.
        let mut loader = Loader::default().keep_sources();
        for (i, d) in [&invalid, &binding, &secret, &foreign.to_owned()]
            .iter()
            .enumerate()
        {
            loader
                .add_file(Path::new(&format!("f{i}.yaml")), d)
                .unwrap();
        }
        loader
            .add_file(
                Path::new("f4.yaml"),
                &doc(
                    "McpServer",
                    "a",
                    "{target: {agentType: t}, name: s, http: {url: \"https://x\"}}",
                ),
            )
            .unwrap();
        let snap = loader.finish();
        let kinds: Vec<&str> = snap.sources.keys().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            ["AgentInstance", "McpServer", "PluginBinding", "Secret"]
        );
        assert_eq!(
            (
                snap.invalid.len(),
                snap.bindings.len(),
                snap.mcp_servers.len()
            ),
            (1, 1, 1)
        );
    }

    /// What a GitOps repository holds beside agent objects is skipped and
    /// counted (refused when strict); what looks meant for agent-env but is
    /// not a kind it serves is an error naming the document.
    #[test]
    fn foreign_documents_are_skipped_and_counted_and_near_misses_refused() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api}\n---\nreplicas: 3\n---\n- a\n- b\n---\napiVersion: kustomize.toolkit.fluxcd.io/v1\nkind: Kustomization\nspec: {path: ./x}\n---\napiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {name: a}\nspec: {agentType: t}\n";
        let mut loader = Loader::default();
        loader.add_file(Path::new("x.yaml"), text).unwrap();
        let snap = loader.finish();
        assert_eq!(snap.instances.len(), 1);
        assert_eq!(
            snap.skipped,
            BTreeMap::from([
                ("ConfigMap".to_owned(), 1),
                ("Deployment".to_owned(), 2),
                ("Kustomization".to_owned(), 1),
                ("document that is not a mapping".to_owned(), 1),
                ("document without apiVersion and kind".to_owned(), 1),
            ])
        );
        assert_eq!(
            snap.skipped_summary().unwrap(),
            "skipped 6 not for agent-env (ConfigMap 1, Deployment 2, Kustomization 1, document that is not a mapping 1, document without apiVersion and kind 1); --strict refuses them"
        );
        let mut strict = Loader::default().with_field_validation(FieldValidation::Strict);
        let e = strict
            .add_file(Path::new("x.yaml"), text)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "x.yaml:1 (document 1): a Deployment, not an agent-env object: refused under --strict (expected one of {KINDS})"
            )
        );
        for (doc, message) in [
            (
                "apiVersion: agentenv.io/v1alpha1\nkind: PluginBindng\nmetadata: {name: b}\n",
                "unknown kind \"PluginBindng\"",
            ),
            (
                "apiVersion: agentenv.io/v1\nkind: PluginBinding\nmetadata: {name: b}\n",
                "unknown kind \"PluginBinding\" (apiVersion \"agentenv.io/v1\")",
            ),
            (
                "apiVersion: v1alpha1\nkind: McpServer\nmetadata: {name: b}\n",
                "unknown kind \"McpServer\"",
            ),
            (
                "kind: Deployment\nmetadata: {name: b}\n",
                "Deployment has no apiVersion",
            ),
            (
                "apiVersion: apps/v1\nmetadata: {name: b}\n",
                "document of apiVersion \"apps/v1\" has no kind",
            ),
            (
                "apiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata: {namespace: x}\n",
                "PluginBinding has no metadata.name",
            ),
        ] {
            let mut loader = Loader::default();
            let e = loader
                .add_file(Path::new("y.yaml"), &format!("# c\n{doc}"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("y.yaml:2 (document 1): "), "{e}");
            assert!(e.contains(message), "{e}");
        }
    }
}
