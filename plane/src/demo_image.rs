//! Builds a Docker image around a program of ours, offline: `FROM scratch` plus the
//! executable and the shared libraries it loads. `plane dev` uses it to package the demo
//! backend (the `plane` binary itself); the test suite packages its test backend the same way.

use anyhow::{bail, Context};
use bollard::image::{BuildImageOptions, ListImagesOptions, RemoveImageOptions, TagImageOptions};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// What to package.
pub struct ImageSpec {
    /// The program to run; it is placed at `/<file name>` in the image.
    pub executable: PathBuf,
    /// Arguments after the program in the image's entrypoint.
    pub args: Vec<String>,
    /// Image repository, e.g. `plane/demo`. The tag is derived from the executable, so a
    /// rebuilt binary gets a fresh image and an unchanged one is reused.
    pub repository: String,
}

/// Returns the image reference for `spec`, building it if the engine lacks it. The image
/// is also tagged `<repository>:latest`.
pub async fn ensure(docker: &Docker, spec: &ImageSpec) -> anyhow::Result<String> {
    let image = format!("{}:{}", spec.repository, fingerprint(&spec.executable)?);
    let missing = docker.inspect_image(&image).await.is_err();
    if missing {
        build(docker, spec, &image).await?;
    }
    docker
        .tag_image(
            &image,
            Some(TagImageOptions {
                repo: spec.repository.as_str(),
                tag: "latest",
            }),
        )
        .await
        .with_context(|| format!("tagging {image} as {}:latest", spec.repository))?;
    if missing {
        remove_older_builds(docker, &spec.repository, &image).await;
    }
    Ok(image)
}

/// Untags earlier builds of the repository so rebuilding the binary does not pile up
/// images. Best effort: an image still used by a container stays.
async fn remove_older_builds(docker: &Docker, repository: &str, current: &str) {
    let filters = [("reference".to_string(), vec![repository.to_string()])].into();
    let options = ListImagesOptions::<String> {
        filters,
        ..Default::default()
    };
    let Ok(images) = docker.list_images(Some(options)).await else {
        return;
    };
    let latest = format!("{repository}:latest");
    for tag in images.iter().flat_map(|image| image.repo_tags.iter()) {
        if tag != current && *tag != latest {
            let options = RemoveImageOptions {
                force: false,
                noprune: false,
            };
            if let Err(err) = docker.remove_image(tag, Some(options), None).await {
                tracing::debug!(%tag, %err, "kept an older image");
            }
        }
    }
}

/// Identifies a build of the executable by its size and modification time.
fn fingerprint(executable: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(executable)
        .with_context(|| format!("reading {}", executable.display()))?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    meta.len().hash(&mut hasher);
    meta.modified().ok().hash(&mut hasher);
    Ok(format!("{:016x}", hasher.finish()))
}

/// Shared libraries mapped into this process: the same C runtime any of our Rust
/// binaries needs, since they are all built by the same toolchain on this machine.
fn shared_libraries() -> anyhow::Result<BTreeSet<PathBuf>> {
    let maps = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    Ok(maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.starts_with('/') && path.contains(".so"))
        .map(PathBuf::from)
        .collect())
}

async fn build(docker: &Docker, spec: &ImageSpec, image: &str) -> anyhow::Result<()> {
    tracing::info!(%image, executable = %spec.executable.display(), "building image");
    let name = spec
        .executable
        .file_name()
        .and_then(|n| n.to_str())
        .context("executable has no file name")?
        .to_string();
    let libraries = shared_libraries()?;

    let mut archive = tar::Builder::new(Vec::new());
    // Docker's tar reader does not accept GNU sparse entries.
    archive.sparse(false);
    archive
        .append_path_with_name(&spec.executable, format!("rootfs/{name}"))
        .with_context(|| format!("adding {}", spec.executable.display()))?;
    let mut library_dirs = BTreeSet::new();
    for library in &libraries {
        let inside = library.strip_prefix("/").unwrap_or(library);
        archive
            .append_path_with_name(library, Path::new("rootfs").join(inside))
            .with_context(|| format!("adding {}", library.display()))?;
        if let Some(dir) = library.parent() {
            library_dirs.insert(dir.display().to_string());
        }
        // Programs name their loader by its canonical path, which may be a symlink on
        // the host; put the loader there too.
        let file_name = library.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if file_name.starts_with("ld-linux") {
            archive
                .append_path_with_name(library, format!("rootfs/lib64/{file_name}"))
                .with_context(|| format!("adding {}", library.display()))?;
        }
    }
    let entrypoint: Vec<String> = std::iter::once(format!("/{name}"))
        .chain(spec.args.iter().cloned())
        .collect();
    let dockerfile = format!(
        "FROM scratch\nCOPY rootfs/ /\nENV LD_LIBRARY_PATH={}\nENTRYPOINT {}\n",
        library_dirs.into_iter().collect::<Vec<_>>().join(":"),
        serde_json::to_string(&entrypoint).context("encoding the entrypoint")?
    );
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    archive
        .append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
        .context("adding the Dockerfile")?;
    let context = archive
        .into_inner()
        .context("finishing the build context")?;

    let options = BuildImageOptions {
        dockerfile: "Dockerfile".to_string(),
        t: image.to_string(),
        rm: true,
        forcerm: true,
        ..Default::default()
    };
    let mut progress = docker.build_image(options, None, Some(context.into()));
    while let Some(step) = progress.next().await {
        let step = step.with_context(|| format!("building {image}"))?;
        if let Some(error) = step.error {
            bail!("building {image} failed: {error}");
        }
    }
    Ok(())
}
