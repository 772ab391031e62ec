//! Projects: what apps, and the keys of the people who may touch them,
//! belong to. The auth service creates them (admins only); the
//! orchestrator reads them to refuse a deploy into a project that does
//! not exist. `default` always exists: it holds everything made before
//! projects, and what names no project.

use std::sync::Arc;

use capstan_store::{Expect, Store, StoreError, Table};
use capstan_types::spec::DEFAULT_PROJECT;
use capstan_types::{Error, ProjectName};
use serde::{Deserialize, Serialize};

pub const TABLE: &str = "projects";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub name: String,
    pub created_ms: i64,
    /// The key name of the admin who created it; empty for `default`.
    pub created_by: String,
}

fn table(store: &Arc<dyn Store>) -> Table<Project> {
    Table::new(store.clone(), TABLE)
}

fn backend(e: StoreError) -> Error {
    Error::internal(format!("projects: {e}"))
}

/// Creates `name`; ALREADY_EXISTS when it does.
pub async fn create(
    store: &Arc<dyn Store>,
    name: &ProjectName,
    created_by: &str,
) -> Result<Project, Error> {
    if name.as_str() == DEFAULT_PROJECT {
        return Err(Error::AlreadyExists(format!(
            "project `{DEFAULT_PROJECT}` always exists"
        )));
    }
    let project = Project {
        name: name.to_string(),
        created_ms: crate::now_ms(),
        created_by: created_by.to_string(),
    };
    match table(store).put(name, &project, Expect::Absent).await {
        Ok(_) => Ok(project),
        Err(StoreError::Conflict { .. }) => {
            Err(Error::AlreadyExists(format!("project `{name}` exists")))
        }
        Err(e) => Err(backend(e)),
    }
}

/// Every project, `default` first, then by name.
pub async fn list(store: &Arc<dyn Store>) -> Result<Vec<Project>, Error> {
    let mut projects = vec![Project {
        name: DEFAULT_PROJECT.to_string(),
        created_ms: 0,
        created_by: String::new(),
    }];
    let mut stored = table(store).values("").await.map_err(backend)?;
    stored.sort_by(|a, b| a.name.cmp(&b.name));
    projects.extend(stored.into_iter().filter(|p| p.name != DEFAULT_PROJECT));
    Ok(projects)
}

/// Whether `name` exists; the error names `field` and how to create it.
pub async fn require(store: &Arc<dyn Store>, field: &str, name: &str) -> Result<(), Error> {
    if name == DEFAULT_PROJECT || table(store).get(name).await.map_err(backend)?.is_some() {
        return Ok(());
    }
    Err(Error::invalid(
        field,
        format!("no project `{name}`: an admin creates it with `capstan project create {name}`"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn projects_are_created_once_and_default_always_exists() {
        let store: Arc<dyn Store> = Arc::new(capstan_store::MemoryStore::new());
        require(&store, "project", "default").await.unwrap();
        let err = require(&store, "project", "team-a").await.unwrap_err();
        assert!(
            err.to_string().contains("capstan project create team-a"),
            "{err}"
        );
        let name = ProjectName::parse("name", "team-a").unwrap();
        create(&store, &name, "admin").await.unwrap();
        require(&store, "project", "team-a").await.unwrap();
        assert!(matches!(
            create(&store, &name, "admin").await,
            Err(Error::AlreadyExists(_))
        ));
        let default = ProjectName::parse("name", "default").unwrap();
        assert!(create(&store, &default, "admin").await.is_err());
        let names: Vec<String> = list(&store)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["default", "team-a"]);
    }
}
