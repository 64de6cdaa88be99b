//! ehm-train: pretrain ViTs with evolved hierarchical masking (and baselines); benchmark steps.
//! A thin front: parse flags, call the library, print. All work lives in `ehm::train`.
use clap::{Args, Parser, Subcommand, ValueEnum};
use ehm::args;
use ehm::config::{MaskingKind, TeacherKind, ZooEntry};
use std::path::PathBuf;
use std::process::ExitCode;

/// `println!` that ends the tool quietly when stdout is closed (`ehm-train … | head`) instead
/// of panicking; other write errors are errors.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*).map_err(ehm::pipeline::stdout_error)?
    }};
}

#[derive(Parser)]
#[command(
    name = "ehm-train",
    version,
    about = "Pretrain ViT backbones with evolved hierarchical masking (EHM), MAE-style"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// MAE pretraining with random | block | grid | ehm masking. Re-running the same command resumes.
    Pretrain(Box<PretrainArgs>),
    /// The masks a strategy makes on IMAGES at chosen training progress, without training:
    /// JSON lines (visible patches, the cut's segments) and a picture
    Masks(Box<MasksArgs>),
    /// Score the hierarchy a run's teacher (or an untrained model) builds: ASA, boundary recall
    /// and best IoU against the exact object masks of a segmentation folder, next to a fixed grid
    Hierarchy(Box<HierarchyArgs>),
    /// Write the untrained initial weights of a zoo entry as a checkpoint folder
    Init {
        #[arg(long, default_value = "vit_tiny_p4_fmnist")]
        model: String,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Time the MAE step on synthetic data (compare with benches/py/mae_reference.py)
    Bench(BenchArgs),
    /// Time the training data path (decode + RandomResizedCrop + flip) on a folder: images/s
    /// (compare with benches/py/loader_torchvision.py)
    BenchLoader(ehm::train::speed::LoaderBenchOptions),
    /// Linear probe of a frozen backbone (BatchNorm without affine + linear, on cached features)
    Probe(ProbeArgs),
    /// Weighted kNN top-1 (k = 20, T = 0.07, as DINO) of a frozen backbone
    Knn {
        /// Run folder (or its checkpoint.safetensors)
        checkpoint: PathBuf,
        #[command(flatten)]
        data: EvalData,
        /// Neighbours that vote
        #[arg(long, default_value_t = 20, value_parser = args::at_least_one)]
        k: usize,
        /// Softmax temperature of the votes (> 0)
        #[arg(long, default_value_t = 0.07, value_parser = positive_f32, allow_negative_numbers = true)]
        temperature: f32,
        #[arg(long)]
        json: bool,
    },
    /// Write images of a data set as PNG files named NNNNN_<class>.png (e.g. to try the tools)
    DumpImages {
        /// fashion-mnist:train|test, cifar:DIR[:split], folder:DIR or photos
        #[arg(long, default_value = "fashion-mnist:test")]
        data: String,
        /// A fixed seeded subset of this many images (0 = all)
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Build the segmentation data set: Tux Paint objects pasted onto registry photos
    MakeSegdata {
        #[arg(long, short)]
        out: PathBuf,
        #[arg(long, default_value_t = 2000)]
        train: usize,
        #[arg(long, default_value_t = 400)]
        val: usize,
        /// Side of the square images
        #[arg(long, default_value_t = 224)]
        size: u32,
        #[arg(long, default_value_t = 4)]
        max_objects: usize,
        /// Two classes, background and object (same images as without): a task small
        /// frozen backbones can learn
        #[arg(long)]
        objects_only: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Fine-tune the whole network as a classifier (layer-wise lr decay, drop path, label smoothing)
    Finetune(Box<FinetuneArgs>),
    /// Train a segmentation head (linear on patch tokens) on images/ + masks/ folders
    Segment(Box<SegmentArgs>),
}

#[derive(Args)]
struct PretrainArgs {
    /// Zoo entry name (models/NAME.toml) or a TOML path
    #[arg(long, default_value = "vit_tiny_p4_fmnist")]
    model: String,
    /// Output folder (checkpoint, config.json, metrics.jsonl, masks.png)
    #[arg(long, short)]
    out: PathBuf,
    /// Data set: fashion-mnist:train, cifar:DIR[:train], folder:DIR, photos (default: the entry's)
    #[arg(long)]
    data: Option<String>,
    /// Use a fixed seeded subset of this many images
    #[arg(long, value_parser = args::at_least_one)]
    limit: Option<usize>,
    /// Epochs (fractions allowed; > 0)
    #[arg(long, value_parser = args::positive, allow_negative_numbers = true)]
    epochs: Option<f64>,
    /// Images per forward pass
    #[arg(long, value_parser = args::at_least_one)]
    batch_size: Option<usize>,
    /// Gradient accumulation: one optimizer step per K forward passes, the same step as one
    /// batch of batch-size × K (which the lr scales with)
    #[arg(long, value_parser = args::at_least_one)]
    accum_steps: Option<usize>,
    /// Base learning rate (lr = blr × batch-size × accum-steps × processes / 256; > 0)
    #[arg(long, value_parser = args::positive, allow_negative_numbers = true)]
    blr: Option<f64>,
    #[arg(long, value_parser = args::non_negative, allow_negative_numbers = true)]
    warmup_epochs: Option<f64>,
    #[arg(long, value_enum)]
    masking: Option<MaskingKind>,
    /// Fraction of patches masked, between 0 and 1
    #[arg(long, value_parser = args::open_fraction, allow_negative_numbers = true)]
    mask_ratio: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    ehm: EhmArgs,
    /// Save a checkpoint every N steps (and at the end)
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    save_every: u64,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    log_every: u64,
    /// kNN monitor every N epochs (0 = at the end only, -1 = never)
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    knn_every: f64,
    #[arg(long)]
    knn_train: Option<String>,
    #[arg(long)]
    knn_test: Option<String>,
    #[arg(long, default_value_t = 10000)]
    knn_train_limit: usize,
    #[arg(long, default_value_t = 2000)]
    knn_test_limit: usize,
    /// Segmentation folder (ehm-train make-segdata) whose val images score the teacher's
    /// hierarchy: ASA, boundary recall, best IoU vs a fixed grid (metrics.jsonl, hierarchy.png)
    #[arg(long)]
    hierarchy_data: Option<PathBuf>,
    /// Hierarchy quality every N epochs (0 = at the start and the end only)
    #[arg(long, default_value_t = 0.0, value_parser = args::non_negative, allow_negative_numbers = true)]
    hierarchy_every: f64,
    /// Val images used for the hierarchy quality (0 = all)
    #[arg(long, default_value_t = 200)]
    hierarchy_limit: usize,
    /// Data-loading threads
    #[arg(long, default_value_t = 2, value_parser = args::at_least_one)]
    workers: usize,
    /// Compute dtype (default: bf16 on CUDA, fp32 on CPU)
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Discard an existing run in --out instead of resuming it
    #[arg(long)]
    fresh: bool,
    /// Print the summary as JSON instead of a table
    #[arg(long)]
    json: bool,
    #[arg(long)]
    no_progress: bool,
    /// Data-parallel on this machine: start N processes (ranks) that share every step's
    /// batch (each loads batch-size × accum-steps images; lr follows the whole batch). Under
    /// torchrun or srun leave it out: the launcher sets the ranks.
    #[arg(long, default_value_t = 1, value_parser = args::at_least_one)]
    nproc: usize,
    /// Data-parallel: seconds a rank waits for the others (rendezvous, each all-reduce) before
    /// the job stops; rank 0's own work (monitors, checkpoints) gets 6 × this
    #[arg(long, default_value_t = 600.0, value_parser = dist_timeout)]
    dist_timeout: f64,
    /// Data-parallel engine [default: nccl on GPUs when its plugin (tools/build_nccl_plugin.sh)
    /// is found next to ehm-train, else gloo]
    #[arg(long, value_enum)]
    dist_backend: Option<ehm::train::dist::DistBackend>,
}

#[derive(Args)]
struct MasksArgs {
    /// [RUN_DIR] IMAGES…: optionally a pretraining run folder first (its teacher parses the
    /// images; without one an untrained --model does), then image files, folders or globs
    #[arg(required = true)]
    inputs: Vec<std::ffi::OsString>,
    /// Zoo entry of the untrained model (when no run folder is given)
    #[arg(long, default_value = "vit_tiny_p4_fmnist")]
    model: String,
    /// Masking strategy (default: the run's; ehm without a run)
    #[arg(long, value_enum)]
    masking: Option<MaskingKind>,
    /// Training progress values, 0 … 1
    #[arg(long = "t", value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1", value_parser = args::fraction)]
    ts: Vec<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the JSON lines here (default: stdout)
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// Write the picture (rows: images; columns: t) here
    #[arg(long)]
    picture: Option<PathBuf>,
    #[command(flatten)]
    ehm: EhmArgs,
}

#[derive(Args)]
struct HierarchyArgs {
    /// Pretraining run folder (default: an untrained --model)
    run: Option<PathBuf>,
    /// Segmentation folder (ehm-train make-segdata; its val split is used)
    #[arg(long)]
    data: PathBuf,
    /// Zoo entry of the untrained model (when no run folder is given)
    #[arg(long, default_value = "vit_tiny_p8_photos64")]
    model: String,
    /// Val images used (0 = all)
    #[arg(long, default_value_t = 0)]
    limit: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    parse: AffinityArgs,
}

fn hierarchy(a: HierarchyArgs) -> ehm::Result<()> {
    let o = ehm::train::inspect::MasksOptions {
        run: a.run.clone(),
        model: a.model.clone(),
        masking: None,
        ts: vec![],
        seed: a.seed,
        images: vec![],
    };
    let apply =
        |p: &mut ehm::config::PretrainConfig, depth: usize| a.parse.apply(&mut p.ehm, depth);
    let r = ehm::train::inspect::hierarchy_quality(&o, &a.data, a.limit, &apply)?;
    if a.json {
        say!("{}", serde_json::to_string(&r).unwrap());
        return Ok(());
    }
    say!(
        "hierarchy of {} on {} val images of {}",
        a.run
            .as_ref()
            .map_or(format!("an untrained {}", a.model), |p| p
                .display()
                .to_string()),
        r.images,
        a.data.display()
    );
    say!("{r}");
    Ok(())
}

fn masks(a: MasksArgs) -> ehm::Result<()> {
    let mut inputs = a.inputs.clone();
    let run = match inputs.first().map(PathBuf::from) {
        Some(p) if ehm::train::inspect::is_run_dir(&p) => {
            if inputs.len() == 1 {
                return Err(ehm::Error::Config(format!(
                    "{} is a run folder: give the images to look at after it",
                    p.display()
                )));
            }
            inputs.remove(0);
            Some(p)
        }
        _ => None,
    };
    let (images, problems) = ehm::pipeline::expand_inputs(&inputs)?;
    if let Some(p) = problems.first() {
        return Err(ehm::Error::MissingData(p.clone()));
    }
    let o = ehm::train::inspect::MasksOptions {
        run,
        model: a.model.clone(),
        masking: a.masking,
        ts: a.ts.clone(),
        seed: a.seed,
        images,
    };
    let apply = |p: &mut ehm::config::PretrainConfig, depth: usize| a.ehm.apply(&mut p.ehm, depth);
    let (records, pic) = ehm::train::inspect::masks(&o, &apply)?;
    let lines: String = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    // files first: a closed stdout ends the tool (quietly) at the first write
    if let Some(p) = &a.picture {
        ehm::files::write_png_atomic(p, &pic)?;
        eprintln!("picture: {}", p.display());
    }
    match &a.jsonl {
        Some(p) => ehm::files::write_atomic(p, lines.as_bytes())?,
        None => {
            use std::io::Write as _;
            std::io::stdout()
                .write_all(lines.as_bytes())
                .map_err(ehm::pipeline::stdout_error)?
        }
    }
    Ok(())
}

/// The EHM knobs that decide how the teacher parses an image (fields of
/// `ehm::config::EhmConfig`; docs/ehm.md).
#[derive(Args, Clone, Default)]
struct AffinityArgs {
    /// Blocks the affinity comes from: all, first:K, last:K or a list like 0,1,2 (default first:3)
    #[arg(long)]
    affinity_blocks: Option<String>,
    /// What the affinity is made of
    #[arg(long, value_enum)]
    affinity: Option<ehm::config::AffinitySource>,
    /// Affinity normalisation before the merge tree
    #[arg(long, value_enum)]
    affinity_norm: Option<ehm::config::AffinityNorm>,
    /// Merge only adjacent segments (contiguous groups) or any two
    #[arg(long, value_enum)]
    merge: Option<ehm::config::Merge>,
}

impl AffinityArgs {
    fn apply(&self, c: &mut ehm::config::EhmConfig, depth: usize) -> ehm::Result<()> {
        if let Some(spec) = &self.affinity_blocks {
            c.set_affinity_blocks(spec, depth)?;
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(affinity, affinity_norm, merge);
        Ok(())
    }
}

/// All the EHM knobs a pretraining run can override (each a field of
/// `ehm::config::EhmConfig`; docs/ehm.md).
#[derive(Args, Clone, Default)]
struct EhmArgs {
    #[command(flatten)]
    parse: AffinityArgs,
    /// EHM teacher: an EMA of the student, or the student itself
    #[arg(long, value_enum)]
    teacher: Option<TeacherKind>,
    /// EMA half-life as a fraction of the run's steps (default 0.02)
    #[arg(long, value_parser = args::positive, allow_negative_numbers = true)]
    ema_half_life: Option<f64>,
    /// EMA half-life in optimizer steps (overrides --ema-half-life)
    #[arg(long, value_parser = args::positive, allow_negative_numbers = true)]
    ema_half_life_steps: Option<f64>,
    /// Shape of the segment-count schedule
    #[arg(long, value_enum)]
    schedule: Option<ehm::config::ScheduleShape>,
    /// Segments at t = 0 (default N / grid_cell²)
    #[arg(long, value_parser = args::at_least_one)]
    start_segments: Option<usize>,
    /// Segments at t = 1 (default max(2, N / 20))
    #[arg(long, value_parser = args::at_least_one)]
    end_segments: Option<usize>,
    /// EPM's per-image jitter: c + randint(0, J) segments
    #[arg(long)]
    segment_jitter: Option<usize>,
    /// α(t) = t^P weighs segment against grid noise (default 0.5: √t)
    #[arg(long, value_parser = args::positive, allow_negative_numbers = true)]
    alpha_power: Option<f64>,
    /// Mask ratio at t = 1 (linear from --mask-ratio)
    #[arg(long, value_parser = args::open_fraction, allow_negative_numbers = true)]
    mask_ratio_end: Option<f64>,
    /// Grid noise layout: parity (EPM, easy start) or cells (whole 2×2 blocks)
    #[arg(long, value_enum)]
    grid_noise: Option<ehm::config::GridNoise>,
}

impl EhmArgs {
    fn apply(&self, c: &mut ehm::config::EhmConfig, depth: usize) -> ehm::Result<()> {
        self.parse.apply(c, depth)?;
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            teacher,
            ema_half_life,
            schedule,
            segment_jitter,
            alpha_power,
            grid_noise
        );
        macro_rules! set_some {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = Some(v); } )* };
        }
        set_some!(
            ema_half_life_steps,
            start_segments,
            end_segments,
            mask_ratio_end
        );
        Ok(())
    }
}

/// The supervised recipe shared by finetune and segment (MAE's fine-tuning defaults).
#[derive(Args)]
struct RecipeArgs {
    #[arg(long, default_value_t = 10, value_parser = args::at_least_one)]
    epochs: usize,
    #[arg(long, default_value_t = 64, value_parser = args::at_least_one)]
    batch_size: usize,
    /// Base learning rate; the peak lr is blr · batch_size / 256 [default: finetune 1e-3;
    /// segment 2e-3, or 0.05 with --freeze-backbone (only the head learns)]
    #[arg(long, value_parser = args::positive, allow_negative_numbers = true)]
    blr: Option<f64>,
    #[arg(long, default_value_t = 1e-6, value_parser = args::non_negative, allow_negative_numbers = true)]
    min_lr: f64,
    #[arg(long, default_value_t = 1.0, value_parser = args::non_negative, allow_negative_numbers = true)]
    warmup_epochs: f64,
    #[arg(long, default_value_t = 0.05, value_parser = args::non_negative, allow_negative_numbers = true)]
    weight_decay: f64,
    /// Layer-wise lr decay (1 = off)
    #[arg(long, default_value_t = 0.75, value_parser = args::positive, allow_negative_numbers = true)]
    layer_decay: f64,
    /// Stochastic depth rate of the last block
    #[arg(long, default_value_t = 0.1, value_parser = args::non_negative, allow_negative_numbers = true)]
    drop_path: f64,
    /// Gradient-norm clip (0 = off)
    #[arg(long, default_value_t = 0.0, value_parser = args::non_negative, allow_negative_numbers = true)]
    clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Discard the resume state in --out and start over
    #[arg(long)]
    fresh: bool,
    /// Input size (a multiple of the patch size; position embeddings are resized bicubically)
    #[arg(long)]
    image_size: Option<u32>,
    #[arg(long)]
    json: bool,
}

impl RecipeArgs {
    fn recipe(&self, label_smoothing: f64, default_blr: f64) -> ehm::train::supervised::Recipe {
        ehm::train::supervised::Recipe {
            epochs: self.epochs,
            batch_size: self.batch_size,
            blr: self.blr.unwrap_or(default_blr),
            min_lr: self.min_lr,
            warmup_epochs: self.warmup_epochs,
            weight_decay: self.weight_decay,
            layer_decay: self.layer_decay,
            drop_path: self.drop_path,
            label_smoothing,
            clip: self.clip,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
struct FinetuneArgs {
    /// Pretraining run folder (or its checkpoint.safetensors)
    checkpoint: PathBuf,
    /// Output folder: checkpoint with head, config.json with labels, finetune.json, confusion.{csv,png}
    #[arg(long, short)]
    out: PathBuf,
    #[command(flatten)]
    data: EvalData,
    #[command(flatten)]
    recipe: RecipeArgs,
    #[arg(long, default_value_t = 0.1, value_parser = args::non_negative, allow_negative_numbers = true)]
    label_smoothing: f64,
    /// Smallest area fraction of the RandomResizedCrop augmentation
    #[arg(long, default_value_t = 0.08)]
    min_crop: f32,
    /// Decoding threads of the data loader
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// A named recipe filling every flag not given: `mae` = MAE's ViT fine-tuning (100
    /// epochs, 5 warm-up, blr 5e-4, layer decay 0.65, drop path 0.1, weight decay 0.05, label
    /// smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 /
    /// CutMix 1.0, global pool)
    #[arg(long = "recipe", value_parser = ["mae"])]
    preset: Option<String>,
    /// Mixup's Beta(α, α) (0 = off)
    #[arg(long, default_value_t = 0.0, value_parser = args::non_negative, allow_negative_numbers = true)]
    mixup: f64,
    /// CutMix's Beta(α, α) (0 = off)
    #[arg(long, default_value_t = 0.0, value_parser = args::non_negative, allow_negative_numbers = true)]
    cutmix: f64,
    /// With Mixup and CutMix both on, the chance a batch uses CutMix
    #[arg(long, default_value_t = 0.5, value_parser = args::fraction, allow_negative_numbers = true)]
    mixup_switch_prob: f64,
    /// Random erasing probability per image
    #[arg(long, default_value_t = 0.0, value_parser = args::fraction, allow_negative_numbers = true)]
    reprob: f64,
    /// RandAugment in timm's spelling, e.g. rand-m9-mstd0.5-inc1 (none = off)
    #[arg(long, default_value = "none")]
    aa: String,
}

#[derive(Args)]
struct SegmentArgs {
    /// Pretraining run folder (or its checkpoint.safetensors)
    checkpoint: PathBuf,
    /// Segmentation folder: images/{train,val}/, masks/{train,val}/ (index or palette PNGs), classes.json
    #[arg(long)]
    data: PathBuf,
    /// Output folder: checkpoint with seg_head, config.json, segment.json, predictions.png
    #[arg(long, short)]
    out: PathBuf,
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Train only the head on frozen backbone features
    #[arg(long)]
    freeze_backbone: bool,
    /// Use the first N train / val pairs (0 = all)
    #[arg(long, default_value_t = 0)]
    train_limit: usize,
    #[arg(long, default_value_t = 0)]
    val_limit: usize,
    /// Val images shown in predictions.png
    #[arg(long, default_value_t = 8)]
    sheet: usize,
}

/// Fill the flags of `a` not given on the command line from a named recipe.
fn apply_finetune_preset(a: &mut FinetuneArgs) {
    if a.preset.as_deref() != Some("mae") {
        return;
    }
    use clap::{parser::ValueSource, CommandFactory};
    let m = Cli::command().get_matches();
    let Some(fm) = m.subcommand_matches("finetune") else {
        return;
    };
    let unset = |id: &str| fm.value_source(id) != Some(ValueSource::CommandLine);
    // MAE's ViT fine-tuning values, by flag (the flag's clap id)
    type Set = fn(&mut FinetuneArgs);
    let mae: [(&str, Set); 12] = [
        ("epochs", |a| a.recipe.epochs = 100),
        ("warmup_epochs", |a| a.recipe.warmup_epochs = 5.0),
        ("blr", |a| a.recipe.blr = Some(5e-4)),
        ("layer_decay", |a| a.recipe.layer_decay = 0.65),
        ("drop_path", |a| a.recipe.drop_path = 0.1),
        ("weight_decay", |a| a.recipe.weight_decay = 0.05),
        ("label_smoothing", |a| a.label_smoothing = 0.1),
        ("mixup", |a| a.mixup = 0.8),
        ("cutmix", |a| a.cutmix = 1.0),
        ("reprob", |a| a.reprob = 0.25),
        ("aa", |a| a.aa = "rand-m9-mstd0.5-inc1".into()),
        ("pool", |a| a.data.pool = ehm::train::probe::Pool::Mean),
    ];
    for (id, set) in mae {
        if unset(id) {
            set(a);
        }
    }
}

fn finetune(mut a: FinetuneArgs) -> ehm::Result<()> {
    apply_finetune_preset(&mut a);
    let rand_augment = match a.aa.as_str() {
        "none" => None,
        s => Some(
            ehm::data::randaugment::RandAugment::parse(s)
                .map_err(|e| ehm::Error::Config(format!("--aa {e}")))?,
        ),
    };
    let o = ehm::train::finetune::FinetuneOptions {
        checkpoint: a.checkpoint,
        train: a.data.train,
        test: a.data.test,
        train_limit: a.data.train_limit,
        test_limit: a.data.test_limit,
        pool: a.data.pool,
        image_size: a.recipe.image_size,
        min_crop: a.min_crop,
        recipe: a.recipe.recipe(a.label_smoothing, 1e-3),
        regularise: ehm::train::mix::Regularise {
            mixup: a.mixup,
            cutmix: a.cutmix,
            switch_prob: a.mixup_switch_prob,
            reprob: a.reprob,
        },
        rand_augment,
        out: a.out,
        workers: a.workers,
        fresh: a.recipe.fresh,
        progress: true,
    };
    let r = ehm::train::finetune::finetune(&o)?;
    if a.recipe.json {
        say!("{}", serde_json::to_string(&r).unwrap());
    } else {
        say!("{r}");
    }
    Ok(())
}

fn segment(a: SegmentArgs) -> ehm::Result<()> {
    let o = ehm::train::segment::SegmentOptions {
        checkpoint: a.checkpoint,
        data: a.data,
        train_limit: a.train_limit,
        val_limit: a.val_limit,
        image_size: a.recipe.image_size,
        freeze_backbone: a.freeze_backbone,
        recipe: a
            .recipe
            .recipe(0.0, if a.freeze_backbone { 0.05 } else { 2e-3 }),
        out: a.out,
        sheet: a.sheet,
        fresh: a.recipe.fresh,
        progress: true,
    };
    let r = ehm::train::segment::segment(&o)?;
    if a.recipe.json {
        say!("{}", serde_json::to_string(&r).unwrap());
    } else {
        say!("{r}");
    }
    Ok(())
}

/// The labelled train/test sets and the feature a frozen-backbone evaluation uses.
#[derive(Args)]
struct EvalData {
    #[arg(long, default_value = "fashion-mnist:train")]
    train: String,
    #[arg(long, default_value = "fashion-mnist:test")]
    test: String,
    /// Use a fixed seeded subset of the training set (0 = all)
    #[arg(long, default_value_t = 0)]
    train_limit: usize,
    #[arg(long, default_value_t = 0)]
    test_limit: usize,
    /// Feature: the class token or the mean of the patch tokens
    #[arg(long, value_enum, default_value_t = ehm::train::probe::Pool::Cls)]
    pool: ehm::train::probe::Pool,
}

#[derive(Args)]
struct ProbeArgs {
    /// Pretraining run folder (or its checkpoint.safetensors)
    checkpoint: PathBuf,
    /// Output folder: checkpoint with head, config.json with labels, probe.json, confusion.{csv,png}
    #[arg(long, short)]
    out: PathBuf,
    #[command(flatten)]
    data: EvalData,
    #[arg(long, default_value_t = 30, value_parser = args::at_least_one)]
    epochs: usize,
    #[arg(long, default_value_t = 256, value_parser = args::at_least_one)]
    batch_size: usize,
    /// SGD (momentum 0.9) learning rate, half-cycle cosine (> 0)
    #[arg(long, default_value_t = 0.1, value_parser = args::positive, allow_negative_numbers = true)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

fn probe(a: ProbeArgs) -> ehm::Result<()> {
    let o = ehm::train::probe::ProbeOptions {
        checkpoint: a.checkpoint,
        train: a.data.train,
        test: a.data.test,
        train_limit: a.data.train_limit,
        test_limit: a.data.test_limit,
        pool: a.data.pool,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
        out: a.out,
    };
    let r = ehm::train::probe::probe(&o)?;
    if a.json {
        say!("{}", serde_json::to_string(&r).unwrap());
    } else {
        say!("{r}");
    }
    Ok(())
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value = "tiny")]
    model: String,
    #[arg(long, default_value_t = 224)]
    img: u32,
    #[arg(long, default_value_t = 16)]
    patch: u32,
    #[arg(long, default_value_t = 256)]
    batch: usize,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    #[arg(long, value_enum, default_value_t = MaskingKind::Random)]
    masking: MaskingKind,
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    #[command(flatten)]
    ehm: EhmArgs,
    /// Also append the JSON line to this file
    #[arg(long)]
    json: Option<PathBuf>,
}

fn positive_f32(s: &str) -> Result<f32, String> {
    args::positive(s).map(|v| v as f32)
}

/// `--dtype`: the compute precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Dtype {
    #[value(alias = "float32")]
    Fp32,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl Dtype {
    fn kind(self) -> tch::Kind {
        match self {
            Dtype::Fp32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// `--dist-timeout`: seconds above 0, at most 30 days.
fn dist_timeout(s: &str) -> Result<f64, String> {
    let v = args::positive(s)?;
    if v > 30.0 * 86400.0 {
        return Err(format!("at most 30 days (2592000 s), got {v}"));
    }
    Ok(v)
}

fn pretrain(a: PretrainArgs) -> ehm::Result<()> {
    use ehm::train::launch;
    let mut e = ZooEntry::find(&a.model)?;
    let dist_timeout = std::time::Duration::from_secs_f64(a.dist_timeout);
    let this = launch::Launch::from_env()?;
    e.pretrain.apply(ehm::config::RecipeOverrides {
        data: a.data,
        limit: a.limit,
        epochs: a.epochs,
        batch_size: a.batch_size,
        accum_steps: a.accum_steps,
        blr: a.blr,
        warmup_epochs: a.warmup_epochs,
        masking: a.masking,
        mask_ratio: a.mask_ratio,
        seed: a.seed,
    });
    let depth = e.vit()?.depth as usize;
    a.ehm.apply(&mut e.pretrain.ehm, depth)?;
    e.pretrain.validate()?;
    if a.nproc > 1 && !launch::launched_locally() {
        if this.world > 1 {
            return Err(ehm::Error::Config(
                "--nproc starts its own ranks; under torchrun or srun leave it out (they set the ranks)".into(),
            ));
        }
        return launch::run_local(a.nproc, dist_timeout);
    }
    let opts = ehm::train::PretrainOptions {
        out: a.out,
        save_every: a.save_every,
        log_every: a.log_every,
        knn_every: a.knn_every,
        knn_train: a.knn_train,
        knn_test: a.knn_test,
        knn_limit: (a.knn_train_limit, a.knn_test_limit),
        hierarchy_data: a.hierarchy_data,
        hierarchy_every: a.hierarchy_every,
        hierarchy_limit: a.hierarchy_limit,
        workers: a.workers,
        dtype: a.dtype.map(Dtype::kind),
        fresh: a.fresh,
        progress: !a.no_progress,
        dist_timeout,
        dist_backend: a.dist_backend,
    };
    let s = ehm::train::pretrain(&e, &opts)?;
    if this.rank != 0 {
        return Ok(()); // rank 0 reports for the job
    }
    if a.json {
        say!("{}", serde_json::to_string(&s).unwrap());
    } else {
        say!("{s}");
    }
    Ok(())
}

fn dump_images(spec: &str, limit: usize, out: &std::path::Path) -> ehm::Result<()> {
    let ds = ehm::data::subset(spec.parse::<ehm::data::DataSpec>()?.open()?, limit, 0);
    for i in 0..ds.len() {
        let class = ds
            .label(i)
            .map(|l| ds.classes()[l].replace(['/', ' '], "-"))
            .unwrap_or_else(|| "unlabelled".into());
        let p = out.join(format!("{i:05}_{class}.png"));
        ehm::files::write_png_atomic(&p, &ds.image(i)?)?;
    }
    say!("wrote {} images of {spec} to {}", ds.len(), out.display());
    Ok(())
}

fn make_segdata(
    out: PathBuf,
    train: usize,
    val: usize,
    size: u32,
    max_objects: usize,
    objects_only: bool,
    seed: u64,
) -> ehm::Result<()> {
    let cache = ehm::files::cache_dir();
    let cfg = ehm::data::segdata::SegDataConfig {
        out,
        stamps: ehm::data::segdata::stamps_dir(&cache),
        photos: ehm::data::photos::collect(&cache)?,
        train_images: train,
        val_images: val,
        size,
        max_objects,
        objects_only,
        min_objects_per_class: 10,
        val_fraction: 0.2,
        seed,
    };
    let t0 = std::time::Instant::now();
    let s = ehm::data::segdata::make_segdata(&cfg)?;
    say!(
        "wrote {} train + {} val images ({}×{}) with {} classes ({}) to {} in {:.1} s, from {} objects and {} background photos",
        s.train_images,
        s.val_images,
        size,
        size,
        s.classes.len(),
        s.classes.join(", "),
        s.out.display(),
        t0.elapsed().as_secs_f64(),
        s.objects,
        s.backgrounds
    );
    Ok(())
}

fn bench(a: BenchArgs) -> ehm::Result<()> {
    let o = ehm::train::speed::BenchOptions {
        arch: format!("vit_{}", a.model),
        image_size: a.img,
        patch_size: a.patch,
        batch: a.batch,
        steps: a.steps,
        warmup: a.warmup,
        masking: a.masking,
        kind: a.dtype.kind(),
        ehm: {
            let mut e = ehm::config::EhmConfig::default();
            let depth =
                ehm::config::VitConfig::preset(&format!("vit_{}", a.model), a.img, a.patch)?.depth;
            a.ehm.apply(&mut e, depth as usize)?;
            e
        },
    };
    let r = ehm::train::speed::bench(&o)?;
    let line = serde_json::to_string(&r).unwrap();
    say!("{line}");
    if let Some(p) = a.json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| ehm::Error::io(&p, e))?;
        writeln!(f, "{line}").map_err(|e| ehm::Error::io(&p, e))?;
    }
    Ok(())
}

fn init(model: &str, out: &std::path::Path) -> ehm::Result<()> {
    let e = ZooEntry::find(model)?;
    let p = ehm::train::pretrain::write_initial_checkpoint(&e, out)?;
    say!("wrote {}", p.display());
    Ok(())
}

fn knn(
    checkpoint: &std::path::Path,
    data: &EvalData,
    k: usize,
    temperature: f32,
    json: bool,
) -> ehm::Result<()> {
    let limits = (data.train_limit, data.test_limit);
    let (acc, ntr, nte) = ehm::train::probe::knn(
        checkpoint,
        &data.train,
        &data.test,
        limits,
        data.pool,
        k,
        temperature,
    )?;
    if json {
        say!(
            "{}",
            serde_json::json!({"knn_top1": acc, "k": k, "temperature": temperature, "train_images": ntr, "test_images": nte})
        );
    } else {
        say!(
            "kNN (k = {k}, T = {temperature}) top-1 {:.2} % on {nte} test images against {ntr}",
            100.0 * acc
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    // `ehm-train … | head` closes stdout early: stop quietly like other Unix tools
    ehm::pipeline::exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Pretrain(a) => pretrain(*a),
        Cmd::Bench(a) => bench(a),
        Cmd::BenchLoader(o) => ehm::train::speed::loader_speed(&o).and_then(|r| {
            say!("{}", serde_json::to_string(&r).unwrap());
            Ok(())
        }),
        Cmd::Masks(a) => masks(*a),
        Cmd::Hierarchy(a) => hierarchy(*a),
        Cmd::Init { model, out } => init(&model, &out),
        Cmd::Probe(a) => probe(a),
        Cmd::DumpImages { data, limit, out } => dump_images(&data, limit, &out),
        Cmd::MakeSegdata {
            out,
            train,
            val,
            size,
            max_objects,
            objects_only,
            seed,
        } => make_segdata(out, train, val, size, max_objects, objects_only, seed),
        Cmd::Knn {
            checkpoint,
            data,
            k,
            temperature,
            json,
        } => knn(&checkpoint, &data, k, temperature, json),
        Cmd::Finetune(a) => finetune(*a),
        Cmd::Segment(a) => segment(*a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
